"""Ahead-of-time GPU compilation of every Triton kernel, without a GPU.

The real launchers of metadd_fast.kernels run on meta tensors at the DC and ImageNet
workload shapes below, with ``JITFunction.run`` replaced by a recorder: each launch gives
its kernel, arguments and constexprs. Triton's own binder for the CUDA backend turns them
into the signature, constexprs and alignment attributes a real launch on that GPU would
compile, and ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds
them with the ptxas inside the triton wheel (sm_90 and sm_80).

Must run without TRITON_INTERPRET (the kernels are then plain JITFunctions):

    PYTHONPATH=$PWD python benchmarks/gpu_compile.py          # compile all, report, exit 1 on failure

Compiled kernels land in Triton's cache (~/.triton/cache, or TRITON_CACHE_DIR), keyed on the
kernel source, signature, constexprs and target: an unchanged kernel is not compiled again.
A run that succeeds also leaves a stamp under ~/.cache/metadd_fast/gpu_compile named by a hash
of the kernels' sources, this file, the workload shapes and the triton version; while that
stamp exists, a run does nothing (``--force`` compiles anyway).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("gpu_compile: unset TRITON_INTERPRET (the interpreter has nothing to compile)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import workloads_cam  # noqa: E402
import workloads_cvar  # noqa: E402
import workloads_nearest  # noqa: E402
from metadd_fast import kernels  # noqa: E402
from metadd_fast.kernels import cam_maps, cvar, map_variance, nearest_centroid  # noqa: E402

ARCHS = (90, 80)
META = torch.device("meta")
STAMPS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metadd_fast" / "gpu_compile"


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its positional and keyword arguments, its grid."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    shape: str = ""


@dataclass
class Compiled:
    """A launch compiled for one architecture."""

    kernel: str
    shape: str
    arch: int
    grid: tuple
    constexprs: dict
    seconds: float
    binary: object = field(repr=False, default=None)


def record_launches(run) -> list[Launch]:
    """The kernel launches ``run()`` makes, recorded instead of executed."""
    launches = []

    def recorder(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, tuple(grid)))

    saved = JITFunction.run
    JITFunction.run = recorder
    try:
        run()
    finally:
        JITFunction.run = saved
    return launches


def _cam_case(name: str, out_size=None, dtype=torch.float32):
    """The CAM forward and backward launchers at a workloads_cam shape, on meta tensors."""
    B, archs, default_out, n = workloads_cam.WORKLOADS[name]
    out_h, out_w = out_size or default_out

    def run():
        feats, heads = [], []
        for C, H, W, kind in archs:
            feats.append(torch.empty(B, C, H, W, device=META, dtype=dtype))
            heads.append(torch.empty(n, C, H * W if kind == "flatten" else 1, device=META))
        rows = [torch.empty(B, device=META, dtype=torch.int64)] * len(archs)
        U, rects = cam_maps.cam_maps_forward(feats, heads, rows, out_h, out_w, True, 2, 1e-8)
        map_variance.map_variance_forward(U)
        dU = map_variance.map_variance_backward(torch.empty(B, device=META), U)
        cam_maps.cam_maps_backward(dU, feats, heads, rows, rects, out_h, out_w, True, 2, 1e-8,
                                   [True] * len(archs), [True] * len(archs))
    return run


def _cvar_case(name: str):
    N, num_groups = workloads_cvar.WORKLOADS[name]

    def run():
        values = torch.empty(N, device=META)
        grad = torch.empty((), device=META)
        if num_groups:
            groups = torch.empty(N, device=META, dtype=torch.int64)
            sums, counts = cvar.cvar_group_stats(values, groups, num_groups)
            _, w = cvar.cvar_tail(sums, counts, workloads_cvar.ALPHA)
            cvar.cvar_values_grad(grad, w, counts, groups, values)
        else:
            _, w = cvar.cvar_tail(values, None, workloads_cvar.ALPHA)
            cvar.cvar_values_grad(grad, w, None, None, values)
        eta = torch.empty((), device=META)
        _, above = cvar.cvar_dual_forward(values, eta, workloads_cvar.ALPHA)
        cvar.cvar_dual_backward(grad, values, eta, workloads_cvar.ALPHA, above)
    return run


def _nearest_case(name: str, dtype=torch.float32):
    N, M, D = workloads_nearest.WORKLOADS[name]

    def run():
        x, c = torch.empty(N, D, device=META, dtype=dtype), torch.empty(M, D, device=META, dtype=dtype)
        nearest_centroid.nearest_centroid_forward(x, c, torch.empty(M, device=META, dtype=dtype),
                                                  torch.empty((), device=META, dtype=dtype))
    return run


# shape name -> launcher run on meta tensors: DC CIFAR-10 IPC 50 and the ImageNet workloads.
SHAPES = {
    "cam dc_cifar10_ipc50": _cam_case("dc_cifar10_ipc50"),
    "cam imagenet_b4096 7x7->7x7": _cam_case("imagenet_b4096"),
    "cam imagenet_b4096 7x7->224x224": _cam_case("imagenet_b4096", (224, 224)),
    "cam imagenet_b4096 bf16 7x7->224x224": _cam_case("imagenet_b4096", (224, 224), torch.bfloat16),
    "cam imagenet_b4096 f64 7x7->7x7": _cam_case("imagenet_b4096", dtype=torch.float64),
    "cvar dc_cifar10_ipc50_groups": _cvar_case("dc_cifar10_ipc50_groups"),
    "cvar values_1e6": _cvar_case("values_1e6"),
    "cvar values_1e7_groups_1e5": _cvar_case("values_1e7_groups_1e5"),
    "nearest cifar10_50k_by_500_d128": _nearest_case("cifar10_50k_by_500_d128"),
    "nearest imagenet_1m_by_50k_d512": _nearest_case("imagenet_1m_by_50k_d512"),
    "nearest imagenet_1m_by_50k_d512 f64": _nearest_case("imagenet_1m_by_50k_d512", torch.float64),
}


def all_kernels() -> set[str]:
    """Names of every @triton.jit kernel (launched ones: those ending in _kernel) of the package."""
    return {name for mod in kernels.LAUNCHER_MODULES for name, obj in vars(mod).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


def _source(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict]:
    """(ASTSource, options) exactly as JITFunction.run would build them for ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(launch.fn, signature, constexprs, attrs), options.__dict__


def _grid(launch: Launch) -> tuple:
    return tuple(int(g) for g in launch.grid)


def compile_launch(launch: Launch, arch: int) -> Compiled:
    target = GPUTarget("cuda", arch, 32)
    src, options = _source(launch, target)
    t0 = time.perf_counter()
    binary = triton.compile(src, target=target, options=options)
    consts = {launch.fn.arg_names[k[0]]: v for k, v in src.constants.items()}
    return Compiled(launch.fn.__name__, launch.shape, arch, _grid(launch), consts, time.perf_counter() - t0, binary)


def capture_all(shapes: dict = SHAPES) -> list[Launch]:
    """Every distinct launch of every shape (one per kernel specialization and shape)."""
    out, seen = [], set()
    for shape, run in shapes.items():
        for launch in record_launches(run):
            launch.shape = shape
            src, _ = _source(launch, GPUTarget("cuda", ARCHS[0], 32))
            key = (shape, src.hash())
            if key not in seen:
                seen.add(key)
                out.append(launch)
    return out


def compile_all(archs=ARCHS, shapes: dict = SHAPES, progress: bool = True) -> list[Compiled]:
    """Compile every captured launch for every architecture; raises on the first failure."""
    launches = capture_all(shapes)
    missing = all_kernels() - {launch.fn.__name__ for launch in launches}
    if missing:
        raise RuntimeError(f"kernels no workload shape launches: {sorted(missing)}")
    results = []
    for launch in launches:
        for arch in archs:
            results.append(compile_launch(launch, arch))
            if progress:
                r = results[-1]
                print(f"sm_{arch} {r.kernel:28s} {r.shape:40s} {r.seconds:6.2f} s", flush=True)
    return results


def content_hash(archs) -> str:
    """Hash of everything the compiled set depends on: the kernel sources, this file and the
    workload modules it takes shapes from, the triton version and the architectures."""
    here = Path(__file__).resolve().parent
    files = sorted(Path(kernels.__file__).resolve().parent.glob("*.py"))
    files += [here / "gpu_compile.py"] + sorted(here.glob("workloads_*.py"))
    h = hashlib.sha256(f"{triton.__version__} {sorted(archs)}".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90 and 80)")
    parser.add_argument("--force", action="store_true", help="compile even when the stamp of these sources exists")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    stamp = STAMPS / content_hash(archs)
    if stamp.exists() and not args.force:
        print(f"cached: {stamp.read_text().strip()} (stamp {stamp}; --force to compile again)")
        return 0
    t0 = time.perf_counter()
    results = compile_all(archs)
    kernels_done = sorted({r.kernel for r in results})
    summary = (f"compiled {len(results)} launches of {len(kernels_done)} kernels for "
               f"{sorted({r.arch for r in results})}: {', '.join(kernels_done)}")
    print(f"{summary} in {time.perf_counter() - t0:.1f} s")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(summary + "\n")
    tmp.replace(stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
