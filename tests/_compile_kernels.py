"""Compile every Triton update kernel variant for an sm_90 (H100) target, with no GPU present.

Run by tests/test_kernels.py in a subprocess without TRITON_INTERPRET (the interpreter never
compiles, so it cannot catch what only fails in Triton's code generator). Prints one line per
variant and exits non-zero at the first that does not compile to a cubin.
"""
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hift_ds.kernels.adagrad import _adagrad_kernel
from hift_ds.kernels.adamw import _adam_kernel
from hift_ds.kernels.sgd import _sgd_kernel

# OUT_KIND -> (grad pointer, model-weight pointer): bf16 weights are stored as int16 bits.
OUT = {0: ("*fp32", "*fp32"), 1: ("*bf16", "*i16"), 2: ("*fp16", "*fp16"), 3: ("*fp32", "*fp32")}
FLAGS = ("DECOUPLED", "HAS_WD", "LERP_LOW", "AMSGRAD", "MAXIMIZE", "MOMENTUM", "NESTEROV")


def signature(kernel, multi: int, out_kind: int, wide: int) -> dict:
    """Argument types as the launchers pass them, for one variant."""
    grad, out = OUT[out_kind]
    sig = {}
    for i, name in enumerate(kernel.arg_names):
        if i in kernel.constexprs:
            sig[name] = "constexpr"
        elif name == "g_ptr":
            sig[name] = grad
        elif name == "out_ptr":
            sig[name] = out
        elif name == "tab_ptr":
            sig[name] = "*i64" if multi else "*fp32"  # flat launches pass the param as a placeholder
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "n":
            sig[name] = "i64" if wide else "i32"
        elif name in ("P", "T"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    count = 0
    for kernel in (_adam_kernel, _sgd_kernel, _adagrad_kernel):
        names = [kernel.arg_names[i] for i in kernel.constexprs]
        for multi, out_kind, flags in itertools.product((0, 1), OUT, (0, 1)):
            wide = flags and not multi
            consts = {n: flags for n in names if n in FLAGS}
            consts.update(OUT_KIND=out_kind, OUT_ROW=5, MULTI=multi, WIDE=wide, BLOCK=2048)
            src = ASTSource(fn=kernel, signature=signature(kernel, multi, out_kind, wide), constexprs=consts)
            compiled = triton.compile(src, target=target, options={"num_warps": 8, "enable_fp_fusion": False})
            assert compiled.asm.get("cubin"), f"{kernel.fn.__name__} {consts}: no cubin"
            count += 1
            print(f"ok {kernel.fn.__name__} multi={multi} out_kind={out_kind} flags={flags}", flush=True)
    print(f"compiled {count} variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
