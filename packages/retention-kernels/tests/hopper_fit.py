"""Run as a script (not interpreted): does every tuned deg-2 kernel have a config that fits the shared memory of an
sm_90 SM (227 KB), for bf16 / fp16 / fp32 inputs at d = e = 128 (the largest footprint)? Compiles with Triton's
bundled ptxas, no GPU needed; prints one line per kernel and dtype and exits 1 when one has no fitting config.
``test_triton_training.py::test_every_kernel_fits_hopper_shared_memory`` runs it. ``--arch 80``: the same for an
A100 (163 KB), where the margin measured between Triton releases on Hopper is assumed too."""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from retention_kernels.triton import function, pair_scan, pairs

SHARED = {90: 232448, 80: 166912}  # bytes per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100/H200, A100
# Triton 3.6 on the H200 asked 331,780 bytes for a config this machine's Triton (3.9) compiles to 264,212: require
# that margin, since the device runs another Triton release.
OTHER_RELEASE_MARGIN = 1.26
SCALARS = {"C", "NP", "T_pad"}  # upper-case names that are not pointers


def signature(kernel, inputs: str, states: str) -> dict:
    def kind(name):
        if name in ("Q", "K", "V", "Y", "DQ", "DK", "DV", "X", "DN"):
            return inputs
        if name in ("STATES", "DSTATES"):
            return states
        if name == "PAIRS":
            return "*i32"
        if name in ("scale", "query_factor"):
            return "fp32"
        return "*fp32" if name[0].isupper() and name not in SCALARS else "i32"

    return {name: kind(name) for name in kernel.arg_names}


def shared_bytes(kernel, config, constants, inputs, states, arch: int = 90) -> int:
    """Shared memory of ``kernel`` compiled for ``sm_<arch>`` with ``config``."""
    values = {k: v for k, v in {**constants, **config.kwargs}.items() if k in kernel.arg_names}
    types = signature(kernel, inputs, states) | {name: "constexpr" for name in values}
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=values),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return compiled.metadata.shared


def main(argv: list[str]) -> int:
    arch = int(argv[argv.index("--arch") + 1]) if "--arch" in argv else 90
    failures = 0
    for dtype, inputs in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        operand = tl.bfloat16 if dtype == "bf16" else tl.float32
        precision = "ieee" if dtype == "fp32" else "tf32"
        states = "*bf16" if dtype == "bf16" else "*fp32"
        constants = dict(DP=128, EP=128, OP=operand, PRECISION=precision, GRAM_PRECISION=precision, HAS_GATE=True,
                         HAS_STATE=True, HAS_INIT=True, BACKWARD=True)
        plan = type("Plan", (), {"operand": operand, "precision": precision})
        layout = type("Layout", (), {"DP": 128})
        key_block = function._key_value_block(plan, layout)
        kernels = {
            "output": (pairs.pair_output_kernel, function._TUNED_OUTPUT),
            "query_grad": (pairs.pair_query_grad_kernel, function._TUNED_QUERY_GRAD),
            "key_state_grad": (pairs.pair_key_state_grad_kernel, function._TUNED_KEY_STATE_GRAD),
            f"key_value_grad BK={key_block}": (pairs.pair_key_value_grad_kernel,
                                               function._TUNED_KEY_VALUE_GRAD[key_block]),
            "chunk_contribution": (pair_scan.pair_chunk_contribution_kernel, pair_scan._TUNED_CONTRIBUTION),
        }
        for name, (kernel, tuned) in kernels.items():
            used = constants
            if name == "key_state_grad":
                used = {**constants, "PRECISION": function._key_state_precision(plan, layout)}
            # The fallbacks at the end of each list first (compiling every config takes minutes); the footprint is
            # not monotonic in the tile sizes and stages, so go on until one fits.
            seen = []
            for config in reversed([*tuned.configs, *tuned.fallbacks]):
                seen.append(shared_bytes(kernel, config, used, inputs, states, arch))
                if seen[-1] * OTHER_RELEASE_MARGIN <= SHARED[arch]:
                    print(f"fits sm_{arch} {dtype} d128 {name}: {seen[-1]} bytes ({config})", flush=True)
                    break
            else:
                failures += 1
                print(f"TOO LARGE sm_{arch} {dtype} d128 {name}: {seen} bytes", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
