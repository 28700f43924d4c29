"""Run as a script (not interpreted): does every deg-2 kernel compile for sm_90, and does every tuned one have a
config that fits the shared memory of an SM (227 KB), for bf16 / fp16 / fp32 inputs at d = e = 128 (the largest
footprint), from an initial state? The kernels are reached through the real host code and compiled with Triton's
bundled ptxas, no GPU needed (``benchmarks/kernel_asm.py``'s capture: the interpreter does not type-check like
the compiler). Prints one line per launch and dtype and exits 1 when a tuned one has no fitting config.
``test_triton_training.py::test_every_kernel_compiles_and_fits_hopper`` runs it. ``--arch 80``: the same for an
A100 (163 KB), where the margin measured between Triton releases on Hopper is assumed too."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from kernel_asm import capture_launches

SHARED = {90: 232448, 80: 166912}  # bytes per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200, A100
# Triton 3.6 on the H200 asked 331,780 bytes for a config this machine's Triton (3.9) compiles to 264,212: require
# that margin, since the device runs another Triton release.
OTHER_RELEASE_MARGIN = 1.26
MODES = ("BACKWARD", "HAS_INIT", "ROUNDING")  # the constants that name a direct launch's variant


def main(argv: list[str]) -> int:
    arch = int(argv[argv.index("--arch") + 1]) if "--arch" in argv else 90
    failures = 0
    for dtype in ("bfloat16", "float16", "float32"):
        launches = capture_launches(dtype, t=2048, d=128, heads=2, state=True, capability=arch)
        for launch in (launch for launch in launches if not launch.configs):  # direct: compiled as launched
            modes = {key: value for key, value in launch.constants.items() if key in MODES}
            print(f"compiled sm_{arch} {dtype} d128 {launch.kernel.__name__} {modes}", flush=True)
        for launch in (launch for launch in launches if launch.configs):  # the tuned ones
            name = f"{launch.kernel.__name__}{' backward' if launch.constants.get('BACKWARD') else ''}"
            # The fallbacks at the end of each list first (compiling every config takes minutes); the footprint is
            # not monotonic in the tile sizes and stages, so go on until one fits.
            seen = []
            for config in reversed(launch.configs):
                seen.append(launch.compile(config).metadata.shared)
                if seen[-1] * OTHER_RELEASE_MARGIN <= SHARED[arch]:
                    print(f"fits sm_{arch} {dtype} d128 {name}: {seen[-1]} bytes ({config})", flush=True)
                    break
            else:
                failures += 1
                print(f"TOO LARGE sm_{arch} {dtype} d128 {name}: {seen} bytes", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
