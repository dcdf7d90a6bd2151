"""Seq2seq with attention on the date task: jitnet's jitted step against the same model in PyTorch CPU eager.

    python bench/seq2seq.py [--threads 2] [--hidden 64] [--embed 32] [--batch 64] [--cell lstm|gru]
                            [--steps 80] [--eval-every 100] [--max-steps 4000] [--quick] [--json out]

Both figures come from this one run, with the same model on both sides: the PyTorch network (nn.LSTM/GRU
encoder over packed sequences, LSTMCell/GRUCell decoder with additive attention, the same output layer) starts
from jitnet's initial weights, sees the same batches in the same order, clips to the same global norm and uses
Adam with the same settings and thread count.

1. Training throughput (sequences/s): after warm-up steps on every source bucket (compiles excluded), jitnet
   and PyTorch take turns in rounds over the same batches, so load from other processes hits both alike.
   Goal: jitnet >= 1.5x PyTorch. The run first checks that both networks give the same loss on a batch.
2. Time to accuracy: both train from the same start, in lockstep (``--eval-every`` steps of one, then of the
   other), until greedy decoding reaches >= 99% exact match on the held-out dates; the clocks count training
   steps only (evaluation excluded). The ratio is PyTorch's seconds over jitnet's. Goal: jitnet needs less.

On a machine shared with other jobs, more threads than free cores slow both sides down many times over
(BLAS and OpenMP workers wait for a busy core); ``--threads 1`` then gives steadier figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import dump, set_threads, table  # noqa: E402

import jitnet as jn  # noqa: E402
from jitnet.data import seq_tasks as T  # noqa: E402
from jitnet.models import seq2seq as S  # noqa: E402


# ==============================================================================================================
# The PyTorch peer
# ==============================================================================================================

def torch_model(net):
    """Return the PyTorch twin of jitnet Seq2Seq ``net`` with the same weights (an nn.Module with a loss method)."""
    import torch
    import torch.nn as tnn

    H, L, cell = net.hidden, net.layers, net.cell
    Rnn, Cell = (tnn.LSTM, tnn.LSTMCell) if cell == "lstm" else (tnn.GRU, tnn.GRUCell)

    def t(a):
        return torch.from_numpy(np.array(a.numpy(), np.float32, copy=True))      # a copy: never jitnet's memory

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = tnn.Embedding(net.src_vocab, net.embed_dim)
            self.tgt_embed = tnn.Embedding(net.tgt_vocab, net.embed_dim)
            self.encoder = Rnn(net.embed_dim, H, num_layers=L, batch_first=True)
            self.cells = tnn.ModuleList([Cell(net.embed_dim + H if i == 0 else H, H) for i in range(L)])
            self.Wq = tnn.Linear(H, net.units, bias=False)
            self.Wk = tnn.Linear(H, net.units)
            self.v = tnn.Linear(net.units, 1, bias=False)
            self.out = tnn.Linear(2 * H, net.tgt_vocab)
            never = torch.zeros(net.tgt_vocab)
            never[[T.PAD, T.SOS]] = -float("inf")
            self.register_buffer("never", never)

        def encode(self, src, mask):
            x = self.src_embed(src)
            lens = mask.sum(1).cpu()
            packed = tnn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
            out, state = self.encoder(packed)
            enc, _ = tnn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
            if cell == "lstm":
                states = [(state[0][i], state[1][i]) for i in range(L)]
            else:
                states = [state[i] for i in range(L)]
            return enc, self.Wk(enc), states

        def step(self, states, emb, enc, pk, mask):
            h_top = states[-1][0] if cell == "lstm" else states[-1]
            e = self.v(torch.tanh(pk + self.Wq(h_top)[:, None, :]))[..., 0]
            w = torch.softmax(e.masked_fill(mask == 0, -1e9), -1)
            ctx = torch.bmm(w[:, None, :], enc)[:, 0]
            x = torch.cat([emb, ctx], -1)
            new = []
            for i, c in enumerate(self.cells):
                s = c(x, states[i])
                new.append(s)
                x = s[0] if cell == "lstm" else s
            return new, x, ctx, w

        def loss(self, src, mask, tgt_in, tgt_out):
            enc, pk, states = self.encode(src, mask)
            emb = self.tgt_embed(tgt_in)
            outs = []
            for i in range(tgt_in.shape[1]):
                states, h, ctx, _ = self.step(states, emb[:, i], enc, pk, mask)
                outs.append(torch.cat([h, ctx], -1))
            logits = self.out(torch.stack(outs, 1))
            per = tnn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                                               reduction="none")
            m = (tgt_out.reshape(-1) != T.PAD).float()
            return (per * m).sum() / m.sum().clamp(min=1.0)

        @torch.no_grad()
        def greedy(self, src, mask, max_len):
            enc, pk, states = self.encode(src, mask)
            tok = torch.full((src.shape[0],), T.SOS, dtype=torch.long)
            toks = []
            for _ in range(max_len):
                states, h, ctx, _ = self.step(states, self.tgt_embed(tok), enc, pk, mask)
                tok = (self.out(torch.cat([h, ctx], -1)) + self.never).argmax(-1)
                toks.append(tok)
            return torch.stack(toks, 1)

    m = Twin()
    with torch.no_grad():
        m.src_embed.weight.copy_(t(net.src_embed.W))
        m.tgt_embed.weight.copy_(t(net.tgt_embed.W))
        for i in range(L):
            enc, dec = getattr(net, f"encoder_{i}"), getattr(net, f"decoder_{i}")
            getattr(m.encoder, f"weight_ih_l{i}").copy_(t(enc.W_ih).T)
            getattr(m.encoder, f"weight_hh_l{i}").copy_(t(enc.W_hh).T)
            getattr(m.encoder, f"bias_ih_l{i}").copy_(t(enc.b if cell == "lstm" else enc.b_ih))
            getattr(m.encoder, f"bias_hh_l{i}").copy_(t(enc.b) * 0 if cell == "lstm" else t(enc.b_hh))
            c = m.cells[i]
            c.weight_ih.copy_(t(dec.W_ih).T)
            c.weight_hh.copy_(t(dec.W_hh).T)
            c.bias_ih.copy_(t(dec.b if cell == "lstm" else dec.b_ih))
            c.bias_hh.copy_(t(dec.b) * 0 if cell == "lstm" else t(dec.b_hh))
        m.Wq.weight.copy_(t(net.attention.query_proj.W).T)
        m.Wk.weight.copy_(t(net.attention.key_proj.W).T)
        m.Wk.bias.copy_(t(net.attention.key_proj.b))
        m.v.weight.copy_(t(net.attention.v.W).T)
        m.out.weight.copy_(t(net.out.W).T)
        m.out.bias.copy_(t(net.out.b))
    return m


class TorchTrainer:
    """Adam + clip_grad_norm_ on the PyTorch twin; ``train_step(batch)`` and ``evaluate(data)`` like jitnet's."""

    def __init__(self, net, trainer, lr, clip_norm, max_len):
        import torch
        self.torch = torch
        self.model = torch_model(net)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.clip, self.max_len, self.jt = clip_norm, max_len, trainer

    def inputs(self, batch):
        src, mask = self.jt.net.source_arrays(batch["src"], batch["src_len"])
        th = self.torch
        return (th.from_numpy(src), th.from_numpy(mask.astype(np.int64)), th.from_numpy(batch["tgt_in"]),
                th.from_numpy(batch["tgt_out"]))

    def train_step(self, batch):
        self.opt.zero_grad()
        loss = self.model.loss(*self.inputs(batch))
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss.item())

    def evaluate(self, data, batch=500):
        correct = 0
        for i in range(0, len(data), batch):
            srcs, tgts = data.sources[i:i + batch], data.targets[i:i + batch]
            src, mask = self.jt._source_batch(srcs)
            toks = self.model.greedy(self.torch.from_numpy(src), self.torch.from_numpy(mask.astype(np.int64)),
                                     self.max_len).numpy()
            correct += sum(self.jt.tgt_vocab.decode(toks[j]) == tgts[j] for j in range(len(srcs)))
        return correct / max(len(data), 1)


# ==============================================================================================================
# Measurements
# ==============================================================================================================

def setup(args):
    """Return (task, jitnet trainer, torch trainer, batcher)."""
    task = T.date_task(args.train_size, args.test_size, seed=args.seed)
    jn.random.seed(args.seed)
    net = S.Seq2Seq(len(task.src_vocab), len(task.tgt_vocab), embed=args.embed, hidden=args.hidden,
                    layers=args.layers, cell=args.cell, reverse_source=args.reverse_source)
    jt = S.Seq2SeqTrainer(net, task.src_vocab, task.tgt_vocab, lr=args.lr, clip_norm=args.clip_norm,
                          max_len=task.max_target_len, eval_batch=500)
    tt = TorchTrainer(net, jt, args.lr, args.clip_norm, task.max_target_len)
    src, tgt = T.encode_pairs(task.train, task.src_vocab, task.tgt_vocab)
    batcher = T.BucketBatcher(src, tgt, args.batch, n_buckets=args.buckets, seed=args.seed)
    return task, jt, tt, batcher


def check_same_model(jt, tt, batch):
    """Raise if the two models disagree on the loss of ``batch`` (same weights, same function): return both."""
    import torch
    with torch.no_grad():
        lt = float(tt.model.loss(*tt.inputs(batch)))
    with jn.no_grad():
        lj = float(jt.net.loss(*jt.step_inputs(batch)).item())
    if abs(lj - lt) > 1e-4 * max(1.0, abs(lt)):
        raise AssertionError(f"the PyTorch twin is not the same model: loss {lt} vs jitnet {lj}")
    return lj, lt


def throughput(args):
    """Return a result row: training sequences/s of jitnet and PyTorch in alternating rounds, and the ratio.

    Wall-clock seconds give the figure; the CPU seconds of this process (``time.process_time``) are in the note,
    a steadier ratio when other jobs share the machine.
    """
    task, jt, tt, batcher = setup(args)
    batches = list(batcher.batches(0))
    lj, lt = check_same_model(jt, tt, batches[0])
    print(f"same model: initial loss jitnet {lj:.6f}, torch {lt:.6f}", flush=True)
    first = {}
    for b in batches:                          # one batch per bucket first: the compiles, timed apart
        first.setdefault(b["src"].shape[1], b)
    t0 = time.perf_counter()
    for b in first.values():
        for _ in range(args.warmup):
            jt.train_step(b)[0].item()
    compile_s = time.perf_counter() - t0
    for b in first.values():
        tt.train_step(b)
    timed = batches[:args.steps]
    rounds = max(1, min(args.rounds, len(timed)))
    per = len(timed) // rounds
    tj = tq = cj = cq = 0.0
    nseq = 0
    for r in range(rounds):
        chunk = timed[r * per:(r + 1) * per]
        t0, c0 = time.perf_counter(), time.process_time()
        for b in chunk:
            jt.train_step(b)[0].item()
        tj += time.perf_counter() - t0
        cj += time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        for b in chunk:
            tt.train_step(b)
        tq += time.perf_counter() - t0
        cq += time.process_time() - c0
        nseq += sum(len(b["index"]) for b in chunk)
    sj, st = nseq / tj, nseq / tq
    return {"figure": "train seq/s", "jitnet": sj, "torch": st, "ratio": sj / st, "goal": ">=1.5x",
            "met": "met" if sj / st >= 1.5 else "not met",
            "note": f"{per * rounds} steps each, batch {args.batch}, buckets {sorted(first)}; CPU-time ratio "
                    f"{cq / cj:.2f}; jitnet warm-up (compiles) {compile_s:.1f} s"}


def time_to_accuracy(args):
    """Return a result row: training seconds of each framework to reach the target held-out exact match."""
    task, jt, tt, batcher = setup(args)
    first = {}
    for b in batcher.batches(0):
        first.setdefault(b["src"].shape[1], b)
    # compile every bucket's step (and the decoder) on a throw-away copy of the state: restored below
    snap = [p.numpy().copy() for p in jt.net.parameters()]
    opt_state = jt.opt.state_dict()
    for b in first.values():
        for _ in range(args.warmup):
            jt.train_step(b)[0].item()
    jt.evaluate(task.test, limit=10)
    for p, a in zip(jt.net.parameters(), snap):
        p.assign(a)
    jt.opt.load_state_dict(opt_state)
    clock = {"jitnet": 0.0, "torch": 0.0}
    reached = {"jitnet": None, "torch": None}
    acc = {"jitnet": 0.0, "torch": 0.0}
    step, epoch = 0, 0
    it = iter(batcher.batches(epoch))
    log = []
    while step < args.max_steps and (reached["jitnet"] is None or reached["torch"] is None):
        chunk = []
        while len(chunk) < args.eval_every:
            b = next(it, None)
            if b is None:
                epoch += 1
                it = iter(batcher.batches(epoch))
                continue
            chunk.append(b)
        step += len(chunk)
        for name, run in (("jitnet", lambda b: jt.train_step(b)[0].item()), ("torch", tt.train_step)):
            if reached[name] is not None:
                continue
            t0 = time.perf_counter()
            for b in chunk:
                run(b)
            clock[name] += time.perf_counter() - t0
            acc[name] = jt.evaluate(task.test)["exact_match"] if name == "jitnet" else tt.evaluate(task.test)
            if acc[name] >= args.target:
                reached[name] = (step, clock[name])
        log.append(f"step {step}: jitnet {acc['jitnet']:.4f} ({clock['jitnet']:.1f} s), torch "
                   f"{acc['torch']:.4f} ({clock['torch']:.1f} s)")
        print("  " + log[-1], flush=True)
    rj, rt = reached["jitnet"], reached["torch"]
    ratio = (rt[1] / rj[1]) if (rj and rt) else None
    fmt = (lambda r: f"{r[1]:.1f} s / {r[0]} steps" if r else f"not reached in {step} steps")
    return {"figure": f"seconds to {args.target:.0%} held-out exact match", "jitnet": fmt(rj), "torch": fmt(rt),
            "ratio": ratio if ratio is not None else "", "goal": ">1x (less time)",
            "met": "met" if ratio is not None and ratio > 1 else "not met",
            "note": f"final exact match jitnet {acc['jitnet']:.4f}, torch {acc['torch']:.4f}; evaluated every "
                    f"{args.eval_every} steps on {len(task.test)} held-out pairs"}


def main(argv=None):
    """Run the benchmark and print the table; return the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--reverse-source", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buckets", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip-norm", type=float, default=5.0)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=80, help="timed steps per framework (throughput)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=4, help="untimed jitnet steps per bucket (compiles)")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--only", nargs="+", choices=["throughput", "accuracy"], default=["throughput", "accuracy"])
    p.add_argument("--quick", action="store_true", help="small run: 30 timed steps, target 90%%, 1500 steps max")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.target, args.max_steps = 30, 3, 0.9, 1500
        args.train_size, args.test_size = 10000, 500
    set_threads(args.threads)
    rows = []
    print(f"seq2seq dates: {args.cell} hidden {args.hidden}, embed {args.embed}, layers {args.layers}, batch "
          f"{args.batch}, {args.threads} threads", flush=True)
    if "throughput" in args.only:
        rows.append(throughput(args))
        print(f"throughput: jitnet {rows[-1]['jitnet']:.0f} seq/s, torch {rows[-1]['torch']:.0f} seq/s, "
              f"{rows[-1]['ratio']:.2f}x", flush=True)
    if "accuracy" in args.only:
        rows.append(time_to_accuracy(args))
    table(rows, title=f"seq2seq with attention (dates), jitted jitnet step vs PyTorch CPU eager, {args.threads} "
                      f"threads")
    dump(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
