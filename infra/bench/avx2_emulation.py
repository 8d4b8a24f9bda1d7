"""Run cotd on this machine as if its CPU had AVX2 but no AVX-512 and no native bf16: a proxy for the
AVX2-only CI machine type, not a measurement of it (the cores stay this machine's).

With COTD_EMULATE_AVX2=1 in the environment, importing this module makes
- vLLM load its AVX2 kernels (vllm/_C_AVX2), as it decides from torch.cpu's AVX-512 checks;
- cotd's `dtype: auto` and `precision: auto` see no native bf16 (float32 teacher, fp32 training);
and ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 cap
PyTorch's own kernels. Ray workers do not keep PYTHONPATH (cotd sets its own), so the module is
imported through a .pth file in the environment's site-packages, removed afterwards:

    cp infra/bench/avx2_emulation.py .venv/lib/python3.11/site-packages/
    echo "import avx2_emulation" > .venv/lib/python3.11/site-packages/zz_avx2_emulation.pth
    COTD_EMULATE_AVX2=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/cotd run configs/pipelines/quickstart.yaml out_dir=runs/quickstart-avx2
    rm .venv/lib/python3.11/site-packages/zz_avx2_emulation.pth .venv/lib/python3.11/site-packages/avx2_emulation.py

Check that it took: `grep -o 'vllm/_C[A-Z0-9_]*.abi3.so' /proc/$(pgrep -f VLLM::Worker)/maps`
names _C_AVX2, and the log says "engine dtype float32" and "steps in fp32".
"""

import importlib.abc
import os
import sys

PATCHES = {
    "torch.cpu": lambda m: (setattr(m, "_is_avx512_supported", lambda: False),
                            setattr(m, "_is_avx512_bf16_supported", lambda: False),
                            setattr(m, "_is_amx_tile_supported", lambda: False)),
    "jobs.common.engine": lambda m: setattr(m, "cpu_has_native_bf16", lambda *a, **k: False),
}


class _Patched(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        PATCHES[self.name](module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Patched(spec.loader, name)
                return spec
        return None


if os.environ.get("COTD_EMULATE_AVX2") == "1":
    sys.meta_path.insert(0, _Finder())
