"""The GPU paths, exercised where there is no GPU.

1. `init_distributed` with CUDA faked present: which device each process takes.
2. `build_step` + `train_step` of the `tiny` and `paper` presets on *fake* CUDA tensors (PyTorch's `FakeTensorMode`:
   tensors that carry a shape, a dtype and a device but no memory, so that every op checks its devices and dtypes
   as on a GPU), in fp32, bf16 and fp16, in one process and as rank 0 of two on a fake process group.
3. Host synchronisations per step: a dispatch mode that counts every operation that makes the host wait for a GPU.

How to read the synchronisation count (`SyncCounter`). On a GPU, the host queues kernels and runs ahead of them; an
operation that needs a value computed on the device (`.item()`, `bool(tensor)`, `.tolist()`, `nonzero`, `bincount`,
a copy to the host) or a blocking copy from pageable host memory to the device (`x.new_tensor((...))`,
`torch.tensor(list, device=...)`: PyTorch synchronises the stream after such a copy) stops the host until the GPU
has drained its queue, and the GPU then idles while the host queues the next kernels. Each such site is counted once
per call, under its source line in relicv2 (`counter.table()` prints them). The bounds below are what the code does
today, measured: a change that adds a synchronisation to the views or the loss fails here and has to say why.

Limits of the fake-CUDA step, said where they apply: PyTorch's autograd engine cannot run on fake CUDA tensors in a
CUDA build of PyTorch without a driver (what `pip install torch` gives on Linux, here and in CI: the engine asks the
driver for the device's context before the first backward node), so `loss.backward()` is stood in for by gradients
of each parameter's device and dtype, and the optimiser, the grad scaler and the EMA run on them; DDP's C++ reducer
cannot hold fake tensors, so under two ranks a pass-through module takes its place (its gradient averaging is
PyTorch's own); PyTorch's SyncBatchNorm kernels have no fake implementation, so their output shapes are given.
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import relicv2.distributed as rdist
import relicv2.train as train
from relicv2 import items as ritems
from relicv2.config import preset, update
from relicv2.distributed import DistEnv, init_distributed

PACKAGE = str(Path(rdist.__file__).parent) + os.sep
CUDA0 = torch.device("cuda", 0)


# ---------------------------------------------------------------- 1. which device each process takes
@contextlib.contextmanager
def fake_cuda_present(n_devices: int = 2, current: int = 0):
    "torch.cuda reports `n_devices` devices, `current` the current one; `set_device` and the process group are recorded."
    calls = {"set_device": [], "init_process_group": []}
    state = {"current": current}
    def set_device(d):  # as torch's: an index is needed
        if isinstance(d, torch.device) and d.index is None: raise ValueError("Expected a torch.device with a specified index")
        calls["set_device"].append(torch.device(d)); state["current"] = torch.device(d).index
    with mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.device_count", lambda: n_devices), \
         mock.patch("torch.cuda.current_device", lambda: state["current"]), mock.patch("torch.cuda.set_device", set_device), \
         mock.patch.object(rdist.dist, "init_process_group", lambda *a, **k: calls["init_process_group"].append((a, k))), \
         mock.patch.object(rdist.dist, "is_initialized", lambda: False):
        yield calls


TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("device, environ, current, want, backend", [
    ("auto", {}, 0, "cuda:0", None),  # one process: the current device (was: a crash, set_device refuses "cuda")
    ("cuda", {}, 0, "cuda:0", None),
    ("cuda", {}, 1, "cuda:1", None),  # the current device, when the caller chose another
    ("cuda:1", {}, 0, "cuda:1", None),
    ("cpu", {}, 0, "cpu", None),
    ("auto", TORCHRUN, 0, "cuda:1", "nccl"),  # torchrun: each process its local rank
    ("cuda", TORCHRUN, 0, "cuda:1", "nccl"),
    ("cuda:0", TORCHRUN, 0, "cuda:0", "nccl"),  # as asked
    ("cpu", TORCHRUN, 0, "cpu", "gloo"),
])
def test_init_distributed_takes_an_indexed_cuda_device(monkeypatch, device, environ, current, want, backend):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"): monkeypatch.delenv(k, raising=False)
    for k, v in environ.items(): monkeypatch.setenv(k, v)
    with fake_cuda_present(2, current) as calls:
        env = init_distributed(device)
    assert env.device == torch.device(want)
    assert calls["set_device"] == ([torch.device(want)] if want != "cpu" else [])
    assert (env.world_size, env.rank, env.local_rank) == ((2, 1, 1) if environ else (1, 0, 0))
    if backend is None: assert calls["init_process_group"] == []
    else:
        [(args, kwargs)] = calls["init_process_group"]
        assert args == (backend,) and kwargs.get("device_id") == (torch.device(want) if backend == "nccl" else None)


def test_init_distributed_refuses_a_device_torch_does_not_see(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"): monkeypatch.delenv(k, raising=False)
    with fake_cuda_present(2), pytest.raises(ValueError, match=r"'cuda:2' was asked for, but torch sees 2 CUDA device\(s\): cuda:0 to cuda:1"):
        init_distributed("cuda:2")
    for k, v in {**TORCHRUN, "LOCAL_RANK": "3"}.items(): monkeypatch.setenv(k, v)  # 4 processes on a node with 2 GPUs
    with fake_cuda_present(2), pytest.raises(ValueError, match="'cuda:3' was asked for"):
        init_distributed("auto")


# ---------------------------------------------------------------- 2. counting host synchronisations
A = torch.ops.aten
READS = {A._local_scalar_dense.default: "item", A.nonzero.default: "nonzero", A.bincount.default: "bincount",
         A.unique_consecutive.default: "unique", A._unique2.default: "unique", A.masked_select.default: "masked_select",
         A.repeat_interleave.Tensor: "repeat_interleave"}  # ops whose result the host must wait for


def _site() -> str:
    "The innermost relicv2 source line on the stack: `module.py:line function`."
    for f in reversed(traceback.extract_stack()):
        if f.filename.startswith(PACKAGE): return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
    return "(outside relicv2)"


class SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the GPU, by source line (see the module's docstring).
    Under fake tensors it also answers them, since fake tensors hold no values: `True` for a truth value (a check
    passes, something exists), unless the asking function is named in `answers` (a check phrased as "is it wrong?"),
    `1` for an integer, `0.0` for a float (a grad scaler's "no inf found"), the counts 1, 2, 3... along the last axis
    for a `.tolist()` of integers (non-decreasing, so slices cut with them are valid), half the rows for `nonzero`,
    ones for `bincount`, every row for `x[mask]`."""
    def __init__(self, device_type: str = "cuda", answers: dict | None = None):
        super().__init__()
        self.device_type, self.sites, self.answers = device_type, collections.Counter(), answers or {}

    def _count(self, what: str): self.sites[f"{what:<17} {_site()}"] += 1

    @property
    def total(self) -> int: return sum(self.sites.values())

    def in_modules(self, *modules: str) -> int:
        "Synchronisations at lines of these modules (e.g. 'views.py')."
        return sum(n for k, n in self.sites.items() if k[17:].strip().split(":")[0] in modules)

    def table(self) -> str: return "\n".join(f"{n:4d}  {k}" for k, n in sorted(self.sites.items(), key=lambda kv: kv[0][17:]))

    def __enter__(self):
        real_tolist = torch.Tensor.tolist
        def tolist(t):  # one transfer of the whole tensor, however many elements
            if t.device.type == self.device_type: self._count("tolist")
            if not isinstance(t, FakeTensor): return real_tolist(t)
            if t.dtype.is_floating_point or t.dtype == torch.bool: raise NotImplementedError(f"no answer for tolist of {t.dtype}")
            with _disable_current_modes(): return torch.arange(1, t.shape[-1] + 1).expand(t.shape).tolist() if t.ndim else 1
        self._patches = [mock.patch.object(cls, "tolist", tolist) for cls in (torch.Tensor, FakeTensor)]
        for p in self._patches: p.start()
        return super().__enter__()

    def __exit__(self, *exc):
        for p in self._patches: p.stop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        fake = isinstance(x, FakeTensor)
        if func in READS and x is not None and (fake or x.device.type == self.device_type):
            if x.device.type == self.device_type: self._count(READS[func])  # host tensors (schedules...) cost nothing
            if fake and func is A._local_scalar_dense.default:
                asker = _site().rsplit(" ", 1)[-1]
                if asker in self.answers: return self.answers[asker]
                return True if x.dtype == torch.bool else 0.0 if x.dtype.is_floating_point else 1
            if fake and func is A.nonzero.default:
                return torch.zeros(x.shape[0] // 2, x.ndim, dtype=torch.long, device=x.device)
            if fake and func is A.bincount.default:
                return torch.ones(kwargs.get("minlength", args[2] if len(args) > 2 else 1), dtype=torch.long, device=x.device)
        if func is A.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):  # x[mask]
            if x.device.type == self.device_type: self._count("boolean index")
            if fake:  # every row selected
                args = (x, [torch.arange(i.shape[0], device=i.device) if i is not None and i.dtype == torch.bool else i for i in args[1]])
        out = func(*args, **kwargs)
        if func in (A._to_copy.default, A.copy_.default) and x is not None:
            src, dst = (args[1], args[0]) if func is A.copy_.default else (x, out)
            blocking = not (kwargs.get("non_blocking") or (func is A.copy_.default and len(args) > 2 and args[2]))
            if src.device.type == "cpu" and dst.device.type == self.device_type and blocking:
                self._count("copy to device")
            elif src.device.type == self.device_type and dst.device.type == "cpu": self._count("copy to host")
        return out


# ---------------------------------------------------------------- 3. a training step on fake CUDA tensors
class _FakeCuda(FakeTensorMode):
    "Fake tensors that never touch a real device, even while `torch.cuda.is_available` is patched to say True."
    avoid_device_init = property(lambda self: True)


class _CudaGenerator(torch.Generator):
    "A CPU generator that says it is on cuda:0 (a real CUDA generator needs a driver; fake ops ignore its state)."
    @property
    def device(self): return CUDA0


class _PassThroughDDP(torch.nn.Module):
    "DDP's place in the step: its C++ reducer cannot hold fake tensors, and its gradient averaging is PyTorch's own."
    def __init__(self, module, device_ids=None):
        super().__init__()
        assert device_ids == [CUDA0], device_ids  # what build_step hands DDP on a GPU
        self.module = module

    def forward(self, *a, **k): return self.module(*a, **k)


@contextlib.contextmanager
def _sync_batchnorm_shapes():
    "Shapes of the three CUDA kernels of PyTorch's SyncBatchNorm forward, which have no fake implementation of their own."
    lib = torch.library.Library("aten", "FRAGMENT")
    def stats(x, *rest): return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)
    torch.library.register_fake("aten::batch_norm_stats", stats, lib=lib)
    torch.library.register_fake("aten::batch_norm_gather_stats_with_counts", stats, lib=lib)
    torch.library.register_fake("aten::batch_norm_elemt", lambda x, *rest: torch.empty_like(x), lib=lib)
    try: yield
    finally: lib._destroy()


@contextlib.contextmanager
def fake_cuda_step(world_size: int = 1):
    "Patches under which `build_step` and `train_step` run on fake cuda:0 tensors: yields the fake mode."
    mode, parts = _FakeCuda(allow_non_fake_inputs=True), []
    real_build = train.build_networks
    def build_networks(*a, **k):  # real CPU modules (deepcopy of fake parameters fails); `.to(cuda)` makes them fake
        with _disable_current_modes(): return real_build(*a, **k)
    def gens(seed, rank, device):
        assert device == CUDA0, device
        return {name: _CudaGenerator().manual_seed(seed + i) for i, name in enumerate(("views", "loss"))}
    def stand_in_backward(loss, *a, **k):  # the gradients autograd would leave: each parameter's device and dtype
        assert loss.device == CUDA0 and loss.dtype == torch.float32 and loss.ndim == 0, (loss.device, loss.dtype)
        for p in parts[-1].online.parameters():
            if p.requires_grad: p.grad = torch.zeros_like(p)
    def build_step(*a, **k):
        parts.append(real_build_step(*a, **k)); return parts[-1]
    real_build_step = train.build_step
    with contextlib.ExitStack() as stack:
        for target, value in [("torch.cuda.is_available", lambda: True), ("torch.cuda.is_bf16_supported", lambda *a, **k: True),
                              ("torch.cuda.device_count", lambda: 1), ("torch.cuda.current_device", lambda: 0),
                              ("torch.cuda.is_current_stream_capturing", lambda: False)]:
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(mock.patch.object(train, "build_networks", build_networks))
        stack.enter_context(mock.patch.object(train, "make_generators", gens))
        stack.enter_context(mock.patch.object(train, "build_step", build_step))
        if world_size > 1:
            stack.enter_context(mock.patch.object(train, "DistributedDataParallel", _PassThroughDDP))
            stack.enter_context(_sync_batchnorm_shapes())
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", stand_in_backward))
        stack.enter_context(mode)
        yield mode


def fake_batch(b: int, size: int) -> ritems.Batch:
    "A batch as the loader gives it, on fake cuda:0: uint8 images, uint8 masks in {0, 1}, every image with a mask."
    return ritems.Batch(torch.empty(b, 3, size, size, dtype=torch.uint8, device=CUDA0),
                       torch.empty(b, 1, size, size, dtype=torch.uint8, device=CUDA0),
                       torch.ones(b, dtype=torch.bool, device=CUDA0), torch.full((b,), -1, dtype=torch.long, device=CUDA0))


def run_fake_step(cfg, world_size: int = 1, rank: int = 0):
    "One `train_step` of `cfg` on fake CUDA as `rank` of `world_size`: (parts, loss, SyncCounter)."
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=CUDA0)
    with fake_cuda_step(world_size):
        p = train.build_step(cfg, env, 0, 10)
        batch = fake_batch(cfg.train.batch_size // world_size, cfg.data.image_size)
        with SyncCounter() as sync:
            loss, terms, masked = train.train_step(p, batch, 0)
    return p, loss, terms, masked, sync


def fake_config(name: str, precision: str, **fields):
    "A preset on cuda: `tiny`, or `paper` at its own global batch (fake tensors hold no memory, so its shapes fit)."
    return update(preset(name), {"train.device": "cuda", "train.precision": precision, **fields})


# Host synchronisations per step, measured (see the module's docstring for how to read them). Views: the uint8 masks'
# binary check, the masked (image, view) pairs of the large crops, and one `row_groups` read per view size (48 before
# the ops shared one read: a nonzero, bincount or tolist per op and position, a copy per constant). Loss: none, in one
# process and under DDP (before: two per (online view, target view) pair under DDP, the anchors' range check read from
# the device: 12 a step for tiny, 48 for paper; the trainer now passes its rows as a range, checked on the host).
VIEWS_SYNCS = 4
VIEWS_SYNCS_WITHOUT_MASKS = 2  # no mask to check, no masked pair to select: the `row_groups` reads alone
LOSS_SYNCS = 0


def check_step(cfg, p, loss, terms, masked, world_size: int = 1):
    "What a GPU step must leave: a float32 loss read once (returned on the host), networks and optimiser state on the device, in float32."
    b = cfg.train.batch_size // world_size
    assert loss.device.type == "cpu" and loss.dtype == torch.float32 and loss.ndim == 0  # read in the step: reading it again is free
    assert all(t.device == CUDA0 and t.dtype == torch.float32 for t in terms.values()), terms
    assert tuple(masked.shape) == (cfg.views.n_large, b) and masked.device == CUDA0
    for net in (p.online, p.target):
        if net is None: continue  # simclr and the supervised baseline have no target
        assert {(q.device, q.dtype) for q in net.parameters()} == {(CUDA0, torch.float32)}
    state = [v for s in p.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert state and {v.device for v in state} == {CUDA0}  # the optimiser stepped, on the device
    assert (p.scaler is not None) == (cfg.train.precision == "fp16")


@pytest.mark.parametrize("name", ["tiny", "paper"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_on_fake_cuda(name, precision):
    cfg = fake_config(name, precision)
    t0 = time.perf_counter()
    p, loss, terms, masked, sync = run_fake_step(cfg)
    check_step(cfg, p, loss, terms, masked)
    print(f"{name} {precision}: {time.perf_counter() - t0:.1f} s, {sync.total} host synchronisations\n{sync.table()}")
    assert sync.in_modules("views.py", "augment.py") <= VIEWS_SYNCS, sync.table()
    assert sync.in_modules("loss.py") <= LOSS_SYNCS, sync.table()


@pytest.mark.parametrize("objective", ["simclr", "byol"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_objective_steps_on_fake_cuda(objective, precision):
    # the baselines take other branches of the step (simclr: no target, keys with gradient; byol: no negatives)
    cfg = fake_config("tiny", precision, **{"loss.objective": objective})
    p, loss, terms, masked, sync = run_fake_step(cfg)
    check_step(cfg, p, loss, terms, masked)
    assert (p.target is None) == (objective == "simclr")


@pytest.fixture
def fake_process_group():
    "Two ranks on PyTorch's fake process group (collectives return at once); this process is rank 0, for one test."
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name, precision, sync_bn", [("tiny", "fp32", False), ("tiny", "fp16", True), ("paper", "bf16", True)])
def test_a_training_step_on_fake_cuda_as_rank_0_of_2(fake_process_group, name, precision, sync_bn):
    cfg = fake_config(name, precision, **{"train.sync_bn": sync_bn})
    p, loss, terms, masked, sync = run_fake_step(cfg, world_size=2)
    check_step(cfg, p, loss, terms, masked, world_size=2)
    assert isinstance(p.forward, _PassThroughDDP)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in p.online.modules()) == sync_bn  # PyTorch's, on CUDA
    print(f"{name} {precision} sync_bn={sync_bn}: {sync.total} host synchronisations\n{sync.table()}")
    assert sync.in_modules("views.py", "augment.py") <= VIEWS_SYNCS, sync.table()
    assert sync.in_modules("loss.py") <= LOSS_SYNCS, sync.table()


def test_the_counter_counts_what_waits_for_the_device():
    with _FakeCuda(allow_non_fake_inputs=True), SyncCounter() as sync:
        x = torch.rand(8, 3, device=CUDA0)
        y = (x * 2 + 1).sum(0).softmax(0)  # queued kernels: no waiting
        assert sync.total == 0
        x.sum().item(); bool((x > 0).any()); (x[:, 0] > 0).nonzero(); x.sum(1).long().tolist(); x.cpu()
        x.new_tensor((1.0, 2.0)); torch.tensor([1, 2], device=CUDA0); x[x[:, 0] > 0]
    counted = sorted(k.split("  ")[0].strip() for k in sync.sites for _ in range(sync.sites[k]))
    assert counted == ["boolean index", "copy to device", "copy to device", "copy to host", "item", "item", "nonzero", "tolist"], sync.table()


def test_fit_refuses_a_batch_that_cannot_fit_its_gpu_before_any_work(tmp_path, monkeypatch):
    # fit's first check on a CUDA device (08c_memory's estimate): one line naming the batch that would fit, no run folder
    import relicv2.train as T
    from relicv2.config import preset, update
    from relicv2.files import ConfigError
    from relicv2.distributed import DistEnv
    monkeypatch.setattr(T, "device_memory", lambda device: 4 * 2**30)  # a 4 GiB card
    cfg = update(preset("paper-1gpu"), {"train.out_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"the largest batch a process that fits is \d+"):
        T.fit(cfg, env=DistEnv(device=torch.device("cuda", 0)), progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 4. evaluation on the encoder's device
def stand_in_graph_backward(loss, *a, **k):
    "`loss.backward()` where autograd cannot run (fake CUDA): zero gradients of each leaf of its graph, of its device and dtype."
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen: continue
        seen.add(id(fn))
        if hasattr(fn, "variable"): fn.variable.grad = torch.zeros_like(fn.variable)  # an AccumulateGrad node: a leaf
        stack.extend(f for f, _ in fn.next_functions)


@contextlib.contextmanager
def fake_cuda_eval():
    "Patches under which `evaluate` runs on fake cuda:0: CUDA reported present, pinning a no-op, backward stood in for."
    with contextlib.ExitStack() as stack:
        for target, value in [("torch.cuda.is_available", lambda: True), ("torch.cuda.device_count", lambda: 1),
                              ("torch.cuda.current_device", lambda: 0), ("torch.cuda.set_device", lambda d: None)]:
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", lambda self, *a, **k: self))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", stand_in_graph_backward))
        yield stack.enter_context(_FakeCuda(allow_non_fake_inputs=True))


def _images(n: int, seed: int):
    from relicv2.items import TensorImages
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 4)


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_evaluation_runs_on_the_encoders_device_on_fake_cuda(solver):
    # features stay on the device that computed them and every probe runs there (on the CPU nothing moves: test_evaluate)
    import relicv2.evaluate as ev
    from relicv2.encoder import resnet
    torch.manual_seed(0)
    encoder = resnet("resnet18", width=0.0625, small_stem=True)
    seen = []
    def recording(fn):
        def call(train_feats, *a, **k):
            seen.append((fn.__name__, train_feats.device)); return fn(train_feats, *a, **k)
        return call
    with mock.patch.object(ev, "knn_classify", recording(ev.knn_classify)), \
         mock.patch.object(ev, "linear_probe", recording(ev.linear_probe)), \
         mock.patch.object(ev, "lbfgs_probe", recording(ev.lbfgs_probe)), fake_cuda_eval():
        encoder.to(CUDA0)
        with SyncCounter() as sync:
            out = ev.evaluate(encoder, _images(32, 0), {"val": _images(16, 1)}, knn_k=4, linear_epochs=3, linear_batch_size=8,
                              linear_solver=solver, batch_size=16)
    print(f"{solver}: {sync.total} host synchronisations\n{sync.table()}")
    probe = "linear_probe" if solver == "sgd" else "lbfgs_probe"
    assert seen == [(probe, CUDA0), ("knn_classify", CUDA0)]
    assert set(out["val"]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_balanced", "linear_balanced", "majority_top1", "class_counts"}
    assert sync.sites and not [k for k in sync.sites if k.startswith("copy to host")]  # no feature goes back to the host


def test_the_sgd_probe_waits_for_the_device_as_often_for_any_number_of_epochs():
    # the learning rates and the shuffles come from the host (a CPU generator: the same order as on the CPU; each epoch's
    # through pinned memory), so the steps queue without waiting; only the input checks and the accuracies read values back
    from relicv2.probes import linear_probe
    counts = {}
    for epochs in (1, 4):
        with fake_cuda_eval():
            x, y = torch.randn(64, 8, device=CUDA0), torch.arange(64, device=CUDA0) % 4
            with SyncCounter() as sync:
                r = linear_probe(x, y, x, y, n_classes=4, epochs=epochs, batch_size=16)
        assert r["classifier"].weight.device == CUDA0
        counts[epochs] = dict(sync.sites)
        print(f"{epochs} epochs of 4 steps: {sync.total} host synchronisations\n{sync.table()}")
    assert counts[1] == counts[4], (counts[1], counts[4])


# ---------------------------------------------------------------- 5. what a step waits for, beyond views and loss
def test_a_step_reads_the_device_once_beyond_views_and_loss():
    # the finiteness check and the loss the loop logs are one read (returned on the host); fp16 adds the grad scaler's
    for precision, most in (("fp32", 1), ("bf16", 1), ("fp16", 2)):
        p, loss, terms, masked, sync = run_fake_step(fake_config("tiny", precision))
        assert sync.in_modules("train.py") == most, sync.table()


def test_the_loss_reads_tensor_anchors_once_a_call_and_a_range_never():
    from relicv2.loss import ReLICv2Loss
    crit = ReLICv2Loss(n_negatives=4)
    with _FakeCuda(allow_non_fake_inputs=True):
        views = [torch.randn(8, 16, device=CUDA0) for _ in range(5)]  # L = 2, S = 1: 6 view pairs
        g = _CudaGenerator().manual_seed(0)
        for anchors, want in ((torch.arange(4, 8, device=CUDA0), 1), (range(4, 8), 0), (None, 0)):
            with SyncCounter() as sync:
                crit(views[:2], views[2:3], views[3:5], anchors=anchors, generator=g)
            assert sync.in_modules("loss.py") == want, (anchors, sync.table())  # was 2 a pair for a tensor: 12


def test_stop_signals_are_agreed_on_the_host():
    # one process: no tensor at all (was a copy to the device and a read back, every step); under NCCL, a gloo group
    from relicv2.train import StopSignals, stop_requested
    with _FakeCuda(allow_non_fake_inputs=True), SyncCounter() as sync:
        stop = StopSignals(); stop.received = 15
        assert stop_requested(stop, DistEnv(device=CUDA0)) == 15
    assert sync.total == 0, sync.table()
    made = []
    with mock.patch.object(rdist, "world_size", lambda: 2), mock.patch.object(rdist.dist, "get_backend", lambda *a: "nccl"), \
         mock.patch.object(rdist.dist, "group", mock.Mock(WORLD="nccl group")), \
         mock.patch.object(rdist.dist, "new_group", lambda **k: made.append(k) or "gloo group"):
        assert rdist.host_group() == rdist.host_group() == "gloo group"
    assert made == [{"backend": "gloo"}]  # made once, by every process at the same point
    rdist._HOST_GROUPS.clear()


def test_without_masks_no_mask_is_copied_or_read():
    # a dataset without masks (or masking off): the batch's all-zero masks stay on the host and the views skip their check
    cfg = fake_config("tiny", "fp32")
    env = DistEnv(device=CUDA0)
    with fake_cuda_step():
        p = train.build_step(cfg, env, 0, 10)
        p.masks = False
        host = ritems.Batch(torch.zeros(16, 3, 16, 16, dtype=torch.uint8), torch.zeros(16, 1, 16, 16, dtype=torch.uint8),
                           torch.zeros(16, dtype=torch.bool), torch.full((16,), -1))
        with SyncCounter() as sync:
            batch = train.to_device(host, CUDA0, p.masks)
            loss, terms, masked = train.train_step(p, batch, 0)
    assert batch.masks is None and batch.has_mask is None and batch.images.device == CUDA0
    assert not [k for k in sync.sites if "_check_inputs" in k], sync.table()  # the masks' binary check: gone
    assert sync.in_modules("views.py", "augment.py") <= VIEWS_SYNCS_WITHOUT_MASKS, sync.table()


def test_a_gpu_run_loads_with_workers_into_pinned_memory_and_sets_cudnn_and_tf32(tmp_path, monkeypatch):
    import relicv2.train as T
    from relicv2.files import ConfigError
    ds = torch.utils.data.TensorDataset(torch.zeros(32))
    cfg = update(preset("tiny"), {"train.tf32": False, "train.out_dir": str(tmp_path / "run")})
    with fake_cuda_present(1), mock.patch("os.sched_getaffinity", lambda pid: set(range(16)), create=True):
        _, gpu = T.make_loader(ds, cfg, DistEnv(device=CUDA0))
    _, cpu = T.make_loader(ds, cfg, DistEnv())
    assert (gpu.num_workers, gpu.pin_memory, cpu.num_workers, cpu.pin_memory) == (8, True, 0, False)  # the CPU's as before
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        monkeypatch.setattr(T, "device_memory", lambda device: 2**20)  # fit stops at its memory check, right after
        with pytest.raises(ConfigError, match="images a process, estimated"):
            T.fit(cfg, env=DistEnv(device=CUDA0), progress=False)
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision) == (True, "ieee")
    finally: torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
