"""The CUDA kernels emulated on the CPU (MLHD_CUDA_ON_CPU=1, csrc/cuda_on_cpu): what the
shared suite does not show by running backend "cuda" like every other backend.

* the emulation itself, on kernels with planted defects (tests/emulation/defects.cpp): sums
  as a GPU computes them, races that show as order-dependent results, divergent barriers and
  shuffles and bad launch configurations reported, out-of-range writes caught under
  AddressSanitizer;
* the real kernels: bit-identical results whatever order threads and blocks run in, groups of
  more tensors than the grid holds (65,535 along y, lowered by the emulation to test it),
  launch errors that surface as exceptions, and pointer tables that are never uploaded
  inside a CUDA graph capture.
"""
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import multilevel_hd as mlhd
from conftest import DEVICE
from multilevel_hd.backends import _csrc, unavailable_reason

from cases import OPTION_CASES
from trajectory import assert_bitwise_equal_snapshots, run_case

CASES = {c.name: c for c in OPTION_CASES}
HERE = os.path.dirname(os.path.abspath(__file__))
CXX = os.environ.get("CXX", "c++")

emulated = pytest.mark.skipif(DEVICE.type != "cpu" or unavailable_reason("cuda", "cpu") is not None,
                              reason=f"the CUDA emulation is not in use: {unavailable_reason('cuda', 'cpu')}")
needs_cxx = pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")


# ------------------------------------------------------------------------------------------
# the emulation, on planted defects
@functools.cache
def _defects_binary(sanitize: bool) -> str:
    from torch.utils.cpp_extension import include_paths

    out = os.path.join(tempfile.mkdtemp(prefix="mlhd_defects_"), "defects_asan" if sanitize else "defects")
    cmd = [CXX, "-std=c++17", "-O1", "-DMLHD_CUDA_ON_CPU", *[f"-I{p}" for p in include_paths()],
           os.path.join(HERE, "emulation", "defects.cpp"), os.path.join(_csrc.CSRC, "cuda_on_cpu", "emulation.cpp"),
           "-o", out]
    if sanitize:
        cmd[1:1] = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def _run(case: str, order: str = "ascending", sanitize: bool = False, seed: int = 0):
    env = dict(os.environ, MLHD_CUDA_ON_CPU_ORDER=order, MLHD_CUDA_ON_CPU_SEED=str(seed),
               ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([_defects_binary(sanitize), case], env=env, capture_output=True, text=True, timeout=60)


def _sums(case: str, order: str = "ascending", seed: int = 0) -> list[float]:
    done = _run(case, order, seed=seed)
    assert done.returncode == 0, done.stdout + done.stderr
    return [float(x) for x in done.stdout.split()]


def _expected_input():
    """defects.cpp's input: 4 blocks of 256 values."""
    return [((i * 7919) % 1000) / 8.0 for i in range(4 * 256)]


@needs_cxx
def test_block_sums_are_exact_in_every_order():
    x = _expected_input()
    want = [sum(x[b * 256:(b + 1) * 256]) for b in range(4)]
    for order, seed in (("ascending", 0), ("descending", 0), ("random", 1), ("random", 2)):
        assert _sums("sum", order, seed) == want, order


@needs_cxx
def test_a_missing_barrier_shows_as_results_that_depend_on_the_order():
    """A race: thread 0 reads the warps' partial sums before all have been written."""
    x = _expected_input()
    want = [sum(x[b * 256:(b + 1) * 256]) for b in range(4)]
    runs = [_sums("sum-missing-barrier", order, seed)
            for order, seed in (("ascending", 0), ("descending", 0), ("random", 1), ("random", 2))]
    assert any(run != runs[0] for run in runs) or runs[0] != want


@needs_cxx
def test_shuffles_compute_what_a_gpu_computes():
    """__shfl_down_sync reads lane + delta, and a lane past the warp keeps its own value: a
    tree that stops one level early leaves lane 0 with the sum of the even lanes."""
    x = _expected_input()[:256]
    assert _sums("warp-sum") == [sum(x[w * 32:(w + 1) * 32]) for w in range(8)]
    assert _sums("warp-sum-off-by-one") == [sum(x[w * 32:(w + 1) * 32:2]) for w in range(8)]


@needs_cxx
@pytest.mark.parametrize("case, message", [
    ("barrier-in-branch", "divergent barrier"),
    ("two-barriers", "divergent __syncthreads"),
    ("shuffle-after-exit", "__shfl_down_sync"),
    ("grid-y-65536", "invalid configuration argument: grid (1,65536,1)"),
])
def test_what_a_gpu_leaves_undefined_is_an_error(case, message):
    done = _run(case)
    assert done.returncode == 3 and message in done.stdout, done.stdout + done.stderr


@needs_cxx
def test_an_out_of_range_write_is_caught_under_address_sanitizer():
    try:
        _defects_binary(True)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"no AddressSanitizer here: {err.stderr[-300:]}")
    assert _run("sum", sanitize=True).returncode == 0  # fibers and barriers work under ASan
    done = _run("out-of-range", sanitize=True)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# the real kernels
SPANNING_SHAPES = (((3, 5000), False), ((40000,), False), ((300, 130), False), ((8, 3, 5, 5), True), ((), False))


@emulated
@pytest.mark.parametrize("name", ["adam-multiplicative", "sgd-shrink-all"])
def test_steps_are_bit_identical_in_every_thread_and_block_order(monkeypatch, name):
    """The kernels have no race and no order-dependent sum: every order gives the same bits."""
    runs = []
    for order, seed in (("ascending", 0), ("descending", 0), ("random", 1), ("random", 7)):
        monkeypatch.setenv("MLHD_CUDA_ON_CPU_ORDER", order)
        monkeypatch.setenv("MLHD_CUDA_ON_CPU_SEED", str(seed))
        runs.append(run_case(CASES[name], "cuda", torch.float32, steps=3, shapes=SPANNING_SHAPES))
    for run, order in zip(runs[1:], ("descending", "random 1", "random 7")):
        assert_bitwise_equal_snapshots(run, runs[0], label=f"{name}: {order} vs ascending")


def _many_tensor_run(backend, count, device="cpu"):
    """Parameters, unit rates after 3 SGD steps of `count` tensors of 2 elements."""
    gen = torch.Generator().manual_seed(0)
    params = [p.clone().to(device).requires_grad_()
              for p in torch.randn(count, 2, generator=gen, dtype=torch.float64).unbind(0)]
    opt = mlhd.MultiLevelSGD(params, lr=0.1, levels=("global", "unit"), hypergrad_lr=1e-3, backend=backend)
    for step in range(3):
        grads = torch.randn(count, 2, generator=gen, dtype=torch.float64) + 1.0
        for p, g in zip(params, grads.to(device)):
            p.grad = g
        opt.step()
    return torch.stack([p.detach().cpu() for p in params]), torch.cat(opt.rates()[0]["unit"]).cpu()


@emulated
def test_groups_with_more_tensors_than_the_grid_holds(monkeypatch):
    """The unit-sum kernel's grid is clamped to the device's grid-y limit (65,535) and its
    blocks loop over the remaining tensors. The emulation lowers that limit to 7, so that 40
    tensors take the loop: the same bits as without a limit (a missing clamp is a launch
    error, a missing loop leaves the last tensors' rates unlearned)."""
    unlimited = _many_tensor_run("cuda", 40)
    monkeypatch.setenv("MLHD_CUDA_ON_CPU_MAX_GRID_Y", "7")
    limited = _many_tensor_run("cuda", 40)
    assert all(torch.equal(a, b) for a, b in zip(limited, unlimited))
    torch.testing.assert_close(limited, _many_tensor_run("cpp", 40), rtol=1e-12, atol=0)


@pytest.mark.skipif(DEVICE.type == "cpu" and os.environ.get("MLHD_TEST_FULL") != "1",
                    reason="65,600 tensors take minutes under the emulation (MLHD_TEST_FULL=1 runs it); "
                           "the grid-limit loop is tested on CPU with a lowered limit")
def test_a_group_of_more_than_65535_tensors():
    if unavailable_reason("cuda", DEVICE) is not None:
        pytest.skip(unavailable_reason("cuda", DEVICE))
    cuda = _many_tensor_run("cuda", 65_600, DEVICE)
    torch.testing.assert_close(cuda, _many_tensor_run("reference", 65_600), rtol=1e-12, atol=0)
    assert not torch.equal(cuda[1][-10:], torch.full((10,), 0.1, dtype=torch.float64))  # learned


@emulated
def test_a_launch_error_is_an_exception_and_changes_nothing(monkeypatch):
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = mlhd.MultiLevelAdam(params, lr=0.01, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    monkeypatch.setenv("MLHD_CUDA_ON_CPU_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="CUDA kernel launch failed.*MLHD_CUDA_ON_CPU_ORDER"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    monkeypatch.setenv("MLHD_CUDA_ON_CPU_ORDER", "ascending")
    opt.step()  # the error was read: the next launch is clean


class _Capturing:
    """The emulated stream reports a CUDA graph capture in progress."""

    def __enter__(self):
        torch.ops.multilevel_hd_cuda_on_cpu.set_capturing(True)

    def __exit__(self, *exc):
        torch.ops.multilevel_hd_cuda_on_cpu.set_capturing(False)


@emulated
def test_no_pointer_upload_inside_a_capture():
    """A captured step may not upload pointer tables (the graph would replay a copy from a
    recycled host buffer): with the warm-up's tensors it needs none, and a gradient at a new
    address is refused with an explanation, before anything changed."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 4, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    opt = mlhd.MultiLevelAdam(params, lr=0.01, levels=("global", "unit", "param"), backend="cuda")
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(3):
        opt.step()
    with _Capturing():
        opt.step()
        before = [p.detach().clone() for p in params] + [t.clone() for t in opt.state[params[0]].values()]
        params[0].grad = grads[0].clone()  # zero_grad(set_to_none=True) + backward in the captured region
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            opt.step()
        after = [p.detach() for p in params] + list(opt.state[params[0]].values())
        assert all(torch.equal(a, b) for a, b in zip(before, after))



_SANITIZED_RUN = """
import torch
import multilevel_hd as mlhd
shapes = [(7, 5), (3,), (), (4, 3, 2, 2), (130, 70), (3, 5000), (40000,)]
configs = [(mlhd.MultiLevelAdam, dict(levels=("global", "layer", "unit", "param"), hypergrad_rule="multiplicative")),
           (mlhd.MultiLevelSGD, dict(momentum=0.9, nesterov=True, shrinkage={"unit": 0.1},
                                     levels=("global", "layer", "unit")))]
for cls, kwargs in configs:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
        opt = cls(params, lr=1e-2, backend="cuda", **kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
print("clean")
"""


@emulated
@needs_cxx
def test_the_real_kernels_stay_in_bounds_under_address_sanitizer():
    """The emulated kernels built with AddressSanitizer (MLHD_CUDA_ON_CPU_SANITIZE=address), in
    a process that preloads libasan: any read or write past a tensor's memory, by the launch
    tables' index math or a kernel's loop bounds, aborts the run. (Checked by hand: a unit
    loop running one row too far is caught.)"""
    libasan = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("no libasan for this compiler")
    env = dict(os.environ, MLHD_CUDA_ON_CPU="1", MLHD_CUDA_ON_CPU_SANITIZE="address", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0")
    done = subprocess.run([sys.executable, "-c", _SANITIZED_RUN], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "clean" in done.stdout, (done.stdout + done.stderr)[-3000:]
