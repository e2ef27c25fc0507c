"""SimMatch and CoMatch (mentor.semi) and the memories they keep (mentor.nn.memory): every update and every
loss against a plain-Python computation one image (or one entry) at a time over several steps, wrap-around
included; exact checkpoint round trips; no host synchronisation in a step; real runs on the UCI digits
that train, save and resume bitwise; and two DDP ranks that end with the bank and queue of one process
with the global batch."""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import BNNet, fit_until_signal  # noqa: F401  (registers test_bncnn, test_mlp)
from _nosync import NoHostSync
from _ssl_reference import ce, col_mean, softmax
from _ssl_runs import DDP_RUN, RUN, resumes_bitwise
from torch import nn

from mentor.config import ConfigError, load_config
from mentor.engine import Trainer
from mentor.methods import METHODS, BuildInfo, StepContext
from mentor.nn.distalign import DistAlignQueue
from mentor.nn.memory import EmbeddingHead, FeatureQueue, LabeledMemoryBank, similarity


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def rows(t):
    return [[float(v) for v in r] for r in t]


# -- the memories, entry by entry ----------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_bank_update_writes_each_index_as_a_loop_over_the_batch(momentum):
    torch.manual_seed(0)
    K, D, B = 7, 3, 5
    bank = LabeledMemoryBank(K, D, momentum)
    feats0 = rows(bank.features)
    assert all(abs(dot(r, r) - 1) < 1e-6 for r in feats0) and bank.labels.tolist() == [0] * K
    ref_f, ref_y = feats0, [0] * K
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        f = F.normalize(torch.randn(B, D, generator=g), dim=1)
        y = torch.randint(0, 4, (B,), generator=g)
        idx = torch.randint(0, K, (B,), generator=g)
        idx[3] = idx[0]  # a repeated image: its last occurrence is the one the bank keeps
        old = [list(r) for r in ref_f]
        for i in range(B):  # in batch order, each from the entry as it was before the step
            j, e = int(idx[i]), rows(f)[i]
            ref_f[j] = e if momentum == 0 else unit([momentum * a + (1 - momentum) * b for a, b in zip(old[j], e)])
            ref_y[j] = int(y[i])
        bank.update(f, y, idx)
        torch.testing.assert_close(bank.features, torch.tensor(ref_f), rtol=1e-6, atol=1e-6)
        assert bank.labels.tolist() == ref_y


def ring_push(queue, ptr, new_rows):
    for r in new_rows:
        queue[ptr] = r
        ptr = (ptr + 1) % len(queue)
    return ptr


def test_queue_is_a_first_in_first_out_ring():
    S, D, C = 7, 2, 3
    q = FeatureQueue(S, D, C)
    ref_f, ref_p, ptr = [[0.0] * D for _ in range(S)], [[0.0] * C for _ in range(S)], 0
    g = torch.Generator().manual_seed(2)
    for n in (3, 3, 3, 9, 2, 16, 4):  # wraps the end, and pushes longer than the queue
        f, p = torch.randn(n, D, generator=g), torch.rand(n, C, generator=g)
        if n == 4:  # two parts, concatenated in order
            q.push([f[:1], f[1:]], [p[:1], p[1:]])
        else:
            q.push(f, p)
        ring_push(ref_f, ptr, rows(f))
        ptr = ring_push(ref_p, ptr, rows(p))
        torch.testing.assert_close(q.features, torch.tensor(ref_f))
        torch.testing.assert_close(q.probs, torch.tensor(ref_p))
        assert int(q.ptr) == ptr
    with pytest.raises(ValueError, match="embeddings but"):
        q.push(torch.zeros(2, D), torch.zeros(3, C))


def test_dist_align_queue_divides_by_the_mean_of_the_last_batch_means():
    C, L = 3, 3
    da = DistAlignQueue(C, L, eps=1e-6)
    queue, ptr = [[0.0] * C for _ in range(L)], 0
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        probs = torch.randn(4, C, generator=g).softmax(1)
        queue[ptr], ptr = col_mean(rows(probs)), (ptr + 1) % L
        pm = col_mean(queue)
        expected = []
        for p in rows(probs):
            a = [v * (1 / C + 1e-6) / (m + 1e-6) for v, m in zip(p, pm)]
            expected.append([v / sum(a) for v in a])
        torch.testing.assert_close(da(probs), torch.tensor(expected))
        assert int(da.ptr) == ptr


@pytest.mark.parametrize("heads", [1, 3])
def test_embedding_head_normalises_the_mean_of_its_mlps(heads):
    torch.manual_seed(0)
    head = EmbeddingHead(5, 4, heads)
    f = torch.randn(6, 5)
    with torch.no_grad():
        out = head(f)
        for i in range(6):
            parts = [rows(m[2](torch.relu(m[0](f[i:i + 1]))))[0] for m in head.mlps]
            expected = unit([sum(col) / heads for col in zip(*parts)])
            torch.testing.assert_close(out[i], torch.tensor(expected))
    assert [m[0].out_features for m in head.mlps] == [5] * heads and out.dtype == torch.float32


def test_similarities_are_float32_under_autocast():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, plain = similarity(a, b, 0.1), a @ b.T / 0.1
    assert s.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(s, torch.tensor([[dot(r, c) / 0.1 for c in rows(b)] for r in rows(a)]))


def test_memory_state_round_trips_and_continues_exactly():
    def run(modules, steps):
        g = torch.Generator().manual_seed(4)
        for _ in range(steps):
            bank, queue, da = modules
            bank.update(F.normalize(torch.randn(3, 2, generator=g), dim=1), torch.randint(0, 3, (3,), generator=g),
                        torch.randint(0, 5, (3,), generator=g))
            queue.push(torch.randn(3, 2, generator=g), torch.rand(3, 3, generator=g))
            da(torch.rand(3, 3, generator=g).softmax(1))

    torch.manual_seed(0)
    a = (LabeledMemoryBank(5, 2, 0.7), FeatureQueue(4, 2, 3), DistAlignQueue(3, 2))
    run(a, 3)
    torch.manual_seed(1)
    b = (LabeledMemoryBank(5, 2, 0.7), FeatureQueue(4, 2, 3), DistAlignQueue(3, 2))
    for m_a, m_b in zip(a, b):
        m_b.load_state_dict(m_a.state_dict())
    run(a, 2)
    run(b, 2)
    for m_a, m_b in zip(a, b):
        sa, sb = m_a.state_dict(), m_b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(a[1].state_dict()) == {"features", "probs", "ptr"}


def test_memory_updates_read_nothing_back_to_the_host():
    bank, queue, da = LabeledMemoryBank(5, 2, 0.7), FeatureQueue(4, 2, 3), DistAlignQueue(3, 2)
    with NoHostSync():
        for _ in range(3):
            bank.update(F.normalize(torch.randn(3, 2), dim=1), torch.randint(0, 3, (3,)), torch.tensor([1, 4, 1]))
            queue.push([torch.randn(2, 2), torch.randn(1, 2)], [torch.rand(2, 3), torch.rand(1, 3)])
            da(torch.rand(3, 3).softmax(1))
    assert int(queue.ptr) == 1 and int(da.ptr) == 1


# -- the methods' steps, image by image ------------------------------------------------------------------

C, B, N, K, HIDDEN = 3, 4, 5, 6, 6
INFO = BuildInfo(num_classes=C, in_channels=1, image_size=2, train_size=K, unlabeled_size=20)


class Net(nn.Module):
    """A classifier ``fc(tanh(body(x)))`` without BatchNorm: one concatenated forward equals a forward per
    image, and the features are the input of ``fc``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, HIDDEN)
        self.fc = nn.Linear(HIDDEN, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.body(x.flatten(1))))


def make(name, **hp):
    torch.manual_seed(0)
    student = Net()
    with torch.no_grad():
        student.fc.weight.mul_(5.0)  # confident enough that the threshold keeps some images
    cls = METHODS.get(name)
    method = cls(cls.Config(name=name, **hp), student, INFO)
    method.setup(batch_at(0))
    return method


def batch_at(step):
    g = torch.Generator().manual_seed(20 + step)
    b = {k: torch.randn(n, 1, 2, 2, generator=g) for k, n in
         (("x_weak", B), ("u_weak", N), ("u_strong", N), ("u_strong_1", N))}
    index = torch.randint(0, K, (B,), generator=g)
    index[-1] = index[0]
    b.update(x=b["x_weak"], u=b["u_weak"], y=torch.randint(0, C, (B,), generator=g), index=index,
             u_index=torch.randint(0, 20, (N,), generator=g))
    return b


def per_image(net, head, images):
    """Logits and embedding of every image, each through the network on its own."""
    logits, embs = [], []
    with torch.no_grad():
        for img in images:
            f = torch.tanh(net.body(img.reshape(1, -1)))
            logits.append(rows(net.fc(f))[0])
            embs.append(rows(head(f))[0])
    return logits, embs


def outputs(method, batch, views):
    out = {v: per_image(method.student, method.head, batch[k]) for v, k in views.items()}
    return {v: o[0] for v, o in out.items()}, {v: o[1] for v, o in out.items()}


class DAQueueRef:
    def __init__(self, length):
        self.queue, self.ptr = [[0.0] * C for _ in range(length)], 0

    def __call__(self, probs):
        self.queue[self.ptr], self.ptr = col_mean(probs), (self.ptr + 1) % len(self.queue)
        pm = col_mean(self.queue)
        out = []
        for p in probs:
            a = [v * (1 / C + 1e-6) / (m + 1e-6) for v, m in zip(p, pm)]
            out.append([v / sum(a) for v in a])
        return out


class SimMatchRef:
    """SimMatch's step as USB's train_step reads, one unlabelled image at a time, with its own bank."""

    def __init__(self, method):
        self.c = method.cfg
        self.bank, self.labels = rows(method.bank.features), method.bank.labels.tolist()
        self.da = DAQueueRef(self.c.da_len)
        self.edges = 0

    def step(self, L, E, bank_emb, batch, step):
        c, on = self.c, step >= self.c.memory_start
        probs = self.da([softmax(z) for z in L["u_weak"]])
        sup = sum(ce(z, int(t)) for z, t in zip(L["x"], batch["y"])) / B
        unsup = sim = 0.0
        mask = []
        for p, e_w, e_s, z_s in zip(probs, E["u_weak"], E["u_strong"], L["u_strong"]):
            q = softmax([dot(e_w, k) for k in self.bank], c.T)
            unfold = [q_j * p[y_j] for q_j, y_j in zip(q, self.labels)]
            q_hat = [v / sum(unfold) for v in unfold]
            agg = [sum(q_j for q_j, y_j in zip(q, self.labels) if y_j == k) for k in range(C)]
            target = [c.smoothing_alpha * a + (1 - c.smoothing_alpha) * b for a, b in zip(p, agg)] if on else p
            keep = 1.0 if max(target) >= c.p_cutoff else 0.0
            mask.append(keep)
            unsup += keep * ce(z_s, target) / N
            s = softmax([dot(e_s, k) for k in self.bank], c.T)
            sim += -sum(a * math.log(b) for a, b in zip(q_hat, s)) / N if on else 0.0
        m, old = c.bank_momentum, [list(r) for r in self.bank]
        for e, j, y in zip(bank_emb, batch["index"].tolist(), batch["y"].tolist()):
            self.bank[j] = e if m == 0 else unit([m * a + (1 - m) * b for a, b in zip(old[j], e)])
            self.labels[j] = y
        loss = sup + c.lambda_u * unsup + c.lambda_in * sim
        return {"loss": loss, "sup": sup, "unsup": unsup, "in": sim}, mask


class CoMatchRef:
    """CoMatch's step as USB's train_step reads, one unlabelled image at a time, with its own queue."""

    def __init__(self, method):
        self.c = method.cfg
        size = method.queue.size
        self.feats, self.probs, self.ptr = [[0.0] * self.c.proj_size for _ in range(size)], \
            [[0.0] * C for _ in range(size)], 0
        self.da = DAQueueRef(self.c.da_len)
        self.edges = 0

    def step(self, L, E, batch, step):
        c = self.c
        on = step >= c.memory_start and step > c.queue_batch
        aligned = self.da([softmax(z) for z in L["u_weak"]])
        P = []
        for p, e_w in zip(aligned, E["u_weak"]):
            a = softmax([dot(e_w, k) for k in self.feats], c.T)
            mem = [sum(a_j * r[k] for a_j, r in zip(a, self.probs)) for k in range(C)]
            P.append([c.smoothing_alpha * x + (1 - c.smoothing_alpha) * m for x, m in zip(p, mem)] if on else p)
        sup = sum(ce(z, int(t)) for z, t in zip(L["x"], batch["y"])) / B
        mask = [1.0 if max(p) >= c.p_cutoff else 0.0 for p in P]
        unsup = sum(w * ce(z, p) for w, z, p in zip(mask, L["u_strong"], P)) / N
        contrast = 0.0
        for i in range(N):
            w = [1.0 if i == j else dot(P[i], P[j]) for j in range(N)]
            w = [v if v >= c.contrast_p_cutoff else 0.0 for v in w]
            self.edges += sum(1 for j, v in enumerate(w) if v > 0 and j != i)
            s = softmax([dot(E["u_strong"][i], E["u_strong_1"][j]) for j in range(N)], c.T)
            contrast += -sum(v / sum(w) * math.log(sj + 1e-7) for v, sj in zip(w, s)) / N
        onehot = [[1.0 if k == y else 0.0 for k in range(C)] for y in batch["y"].tolist()]
        ring_push(self.feats, self.ptr, E["u_weak"] + E["x"])
        self.ptr = ring_push(self.probs, self.ptr, aligned + onehot)
        loss = sup + c.lambda_u * unsup + c.lambda_c * contrast
        return {"loss": loss, "sup": sup, "unsup": unsup, "contrast": contrast}, mask


SIM_BASE = {"p_cutoff": 0.6, "memory_start": 2, "da_len": 3, "proj_size": 3}
SIM_CASES = [{}, {"bank_momentum": 0.0}, {"smoothing_alpha": 1.0, "lambda_in": 0.5},
             {"ema_teacher": True, "bank_momentum": 0.0, "ema_decay": 0.5}, {"num_projectors": 3, "T": 0.5}]
SIM_VIEWS = {"x": "x", "u_weak": "u_weak", "u_strong": "u_strong"}


@pytest.mark.parametrize("hp", SIM_CASES, ids=[f"simmatch-{i}" for i in range(len(SIM_CASES))])
def test_simmatch_step_equals_a_per_image_computation(hp):
    method = make("simmatch", **SIM_BASE, **hp)
    ref = SimMatchRef(method)
    masks = []
    for step in range(6):
        batch = batch_at(step)
        L, E = outputs(method, batch, SIM_VIEWS)
        if method.cfg.ema_teacher:
            bank_emb = per_image(method.teacher, method.teacher_head, batch["x"])[1]
        else:
            bank_emb = E["x"]
        expected, mask = ref.step(L, E, bank_emb, batch, step)
        ctx = StepContext(step=step, max_steps=10)
        out = method.training_step(batch, ctx)
        for key, value in expected.items():
            assert float(out[key].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), (key, step)
        assert float(ctx.diagnostics["mask_rate"]) == pytest.approx(sum(mask) / N, abs=1e-6), step
        torch.testing.assert_close(method.bank.features, torch.tensor(ref.bank), rtol=1e-5, atol=1e-6)
        assert method.bank.labels.tolist() == ref.labels
        masks += mask
        with torch.no_grad():  # a moved student, so that an EMA teacher differs from it
            for p in method.student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        method.after_step(ctx)
    assert 0 < sum(masks) < len(masks)
    if method.cfg.ema_teacher:
        assert not torch.equal(method.teacher.fc.weight, method.student.fc.weight)


CO_BASE = {"p_cutoff": 0.6, "contrast_p_cutoff": 0.5, "da_len": 3, "proj_size": 3}
CO_CASES = [{"memory_start": 2, "queue_batch": 1, "queue_size": 13},  # 9 rows a step: the ring wraps
            {"memory_start": 0, "queue_batch": 2, "queue_size": 13, "lambda_c": 0.5},
            {"memory_start": 1, "queue_batch": 1, "T": 0.5}]  # the queue sized in setup: 1 step of rows
CO_VIEWS = {"x": "x", "u_weak": "u_weak", "u_strong": "u_strong", "u_strong_1": "u_strong_1"}


@pytest.mark.parametrize("hp", CO_CASES, ids=[f"comatch-{i}" for i in range(len(CO_CASES))])
def test_comatch_step_equals_a_per_image_computation(hp):
    method = make("comatch", **CO_BASE, **hp)
    assert method.queue.size == (hp.get("queue_size") or B + N)
    ref = CoMatchRef(method)
    masks = []
    for step in range(6):
        batch = batch_at(step)
        L, E = outputs(method, batch, CO_VIEWS)
        expected, mask = ref.step(L, E, batch, step)
        ctx = StepContext(step=step, max_steps=10)
        out = method.training_step(batch, ctx)
        for key, value in expected.items():
            assert float(out[key].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), (key, step)
        assert float(ctx.diagnostics["mask_rate"]) == pytest.approx(sum(mask) / N, abs=1e-6), step
        torch.testing.assert_close(method.queue.features, torch.tensor(ref.feats), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.queue.probs, torch.tensor(ref.probs), rtol=1e-5, atol=1e-6)
        assert int(method.queue.ptr) == ref.ptr
        masks += mask
    assert 0 < sum(masks) < len(masks) and ref.edges > 0  # the graphs had edges between images


@pytest.mark.parametrize("name, hp", [("simmatch", {**SIM_BASE, "ema_teacher": True}),
                                      ("comatch", {**CO_BASE, "memory_start": 1, "queue_batch": 1})])
def test_a_step_reads_nothing_back_to_the_host(name, hp):
    method = make(name, **hp)
    for step in range(4):
        ctx = StepContext(step=torch.tensor(step), max_steps=10, unlabeled_targets=torch.zeros(N, dtype=torch.long))
        with NoHostSync():
            out = method.training_step(batch_at(step), ctx)
            out["loss"].backward()
            method.after_step(ctx)
        assert torch.isfinite(out["loss"])


def test_the_loss_trains_the_head_and_the_student():
    for name, hp in (("simmatch", SIM_BASE), ("comatch", {**CO_BASE, "memory_start": 1, "queue_batch": 1})):
        method = make(name, **hp)
        for step in range(3):
            out = method.training_step(batch_at(step), StepContext(step=step, max_steps=10))
        out["loss"].backward()
        assert method.head.mlps[0][0].weight.grad.abs().sum() > 0, name
        assert method.student.body.weight.grad.abs().sum() > 0, name


def test_usb_defaults_and_their_ranges():
    sim, co = (METHODS.get(n).Config(name=n) for n in ("simmatch", "comatch"))
    assert (sim.T, sim.p_cutoff, sim.lambda_u, sim.lambda_in, sim.proj_size, sim.smoothing_alpha, sim.da_len) == (
        0.1, 0.95, 1.0, 1.0, 128, 0.9, 32)
    assert (sim.ema_teacher, sim.bank_momentum, sim.ema_decay, sim.memory_start, sim.num_projectors) == (
        False, 0.7, 0.999, 1024, 1)
    assert (co.T, co.p_cutoff, co.contrast_p_cutoff, co.lambda_u, co.lambda_c, co.proj_size, co.queue_batch) == (
        0.2, 0.95, 0.8, 1.0, 1.0, 64, 5)
    assert (co.smoothing_alpha, co.da_len, co.memory_start, co.queue_size, co.num_projectors) == (0.9, 32, 1024, 0, 1)
    assert not hasattr(sim, "hard_label") and not hasattr(co, "hard_label")  # the soft p^ is the target
    assert METHODS.get("simmatch")(sim, Net(), INFO).bank.features.shape == (K, 128)  # K = the labelled set
    with pytest.raises(ConfigError, match="labelled set"):
        METHODS.get("simmatch")(sim, Net(), BuildInfo(num_classes=C))
    for name, override in [("simmatch", "bank_momentum=1"), ("simmatch", "T=0"), ("simmatch", "smoothing_alpha=2"),
                           ("simmatch", "num_projectors=0"), ("comatch", "contrast_p_cutoff=1.5"),
                           ("comatch", "queue_batch=0"), ("comatch", "memory_start=-1")]:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"method\.{key}"):
            load_config(None, [f"method.name={name}", f"method.{override}"])


# -- real runs through the engine -----------------------------------------------------------------------

RUN_CASES = {"simmatch": ["method.name=simmatch", "method.memory_start=2", "method.p_cutoff=0.3"],
             "simmatch-teacher": ["method.name=simmatch", "method.memory_start=2", "method.ema_teacher=true",
                                  "method.bank_momentum=0"],
             "comatch": ["method.name=comatch", "method.memory_start=2", "method.queue_batch=1",
                         "method.p_cutoff=0.3"]}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_trains_saves_and_resumes_bitwise_on_digits(tmp_path, case):
    def cfg(run):
        return load_config(None, [f"out_dir={tmp_path / run}", *RUN, *RUN_CASES[case]])

    straight, start, ref, train, saved = resumes_bitwise(cfg, tmp_path)
    term = "contrast" if case == "comatch" else "in"
    assert all(term in e for e in train)
    memory = [k for k in ref if k.startswith(("bank.", "queue.", "dist_align."))]
    assert memory and all(k in saved for k in memory)
    moved = [k for k in memory if k.endswith(("features", "labels", "probs", "queue"))]
    assert all(not torch.equal(ref[k], start[k]) for k in moved)
    if case.startswith("simmatch"):
        labels = straight.splits.train.labels.to(ref["bank.labels"].device)
        written = (ref["bank.features"] != start["bank.features"]).any(1)
        assert written.sum() >= 20 and torch.equal(ref["bank.labels"][written], labels[written])
    else:
        assert straight.method.queue.size == 1 * (16 + 32)


# -- DDP: two ranks, each with half of every batch, keep the bank and queue of one process ------------------

# CoMatch's graph is each rank's own batch, as in USB, so it matches one process only without its loss
# ("comatch"); with it ("comatch-graph") the ranks still hold one queue and one network between them.
DDP_CASES = {"simmatch": ["method.name=simmatch", "method.memory_start=2", "method.p_cutoff=0.3"],
             "comatch": ["method.name=comatch", "method.memory_start=2", "method.queue_batch=1",
                         "method.queue_size=40", "method.p_cutoff=0.3", "method.lambda_c=0"],
             "comatch-graph": ["method.name=comatch", "method.memory_start=2", "method.queue_batch=1",
                               "method.queue_size=40", "method.p_cutoff=0.3"]}


def _ddp_worker(rank, world, port, out, splits):
    import torch.distributed as dist
    from _helpers import torchrun_env

    import mentor.engine.trainer as trainer_module

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")
    trainer_module.shutdown = lambda d, wait=False: None  # one process group for every run
    states = {}
    for case, hp in DDP_CASES.items():
        t = Trainer(load_config(None, [f"out_dir={out}/{case}", *DDP_RUN, *hp, "data.batch_size=8"]), splits=splits)
        t.fit()
        states[case] = t.method.state_dict()
    torch.save(states, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 10-25 s on 2 cores
def test_ddp_ranks_hold_the_memory_of_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    from _helpers import free_port

    from mentor.engine.inputs import load_splits

    splits = load_splits(load_config(None, DDP_RUN).data)
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), splits), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case in DDP_CASES:
        for key, value in ranks[0][case].items():
            assert torch.equal(ranks[1][case][key], value), (case, key)  # one state on both ranks
    for case in ("simmatch", "comatch"):
        one = Trainer(load_config(None, [f"out_dir={tmp_path / 'one' / case}", *DDP_RUN, *DDP_CASES[case],
                                         "data.batch_size=16"]), splits=splits)
        one.fit()
        for key, value in one.method.state_dict().items():
            got = ranks[0][case][key]
            if value.is_floating_point():
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=f"{case} {key}")
            else:
                assert torch.equal(got, value), (case, key)
    assert int(ranks[0]["comatch"]["queue.ptr"]) == (5 * 48) % 40  # 48 global rows a step, wrapped


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simmatch", "comatch"])
def test_learns_the_digits_from_four_labels_per_class(tmp_path, name):
    # 200 steps of resnet8 on 40 labels and the rest of the digits unlabelled, the memory read from step 50.
    summary = Trainer(load_config(None, [
        f"out_dir={tmp_path / name}", f"method.name={name}", "method.memory_start=50", "data.name=digits",
        "data.val_size=200", "data.padding=1", "data.flip=false", "model.name=resnet8", "data.labels_per_class=4",
        "data.batch_size=16", "data.unlabeled_ratio=2", "optim.lr=0.05", "trainer.max_steps=200",
        "trainer.eval_every=200", "trainer.ckpt_every=200", "trainer.log_every=50", "trainer.progress=false"])).fit()
    assert summary["test_acc_last"] > 0.6
