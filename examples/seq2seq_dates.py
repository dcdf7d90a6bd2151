"""Seq2seq with attention: normalise human-written dates to ISO (character level), to >= 99% held-out exact match.

    python examples/seq2seq_dates.py [--hidden 64 --batch-size 64 --threads 2 ...]   (any seq2seq-dates option)

Trains until greedy decoding gets 99% of the held-out dates exactly right (dates and format/month pairs never
seen in training), then prints decoded samples (greedy and beam search), an attention map as text, a few
made-up inputs, and writes the attention heat map to LOGDIR/attention.png when matplotlib is installed.
"""
from __future__ import annotations

import sys
import time

import jitnet as jn
from jitnet.models import _seq2seq_cli as S

GOAL = 0.99


def main():
    """Train, print samples and the figure with its goal; return the final metrics."""
    jn.set_num_threads(2)
    argv = ["--hidden", "64", "--embed", "32", "--batch-size", "64", "--eval-every", "100",
            "--logdir", "runs/seq2seq-dates"] + sys.argv[1:]
    t0 = time.perf_counter()
    trainer, m = S.run_dates(argv)
    wall = time.perf_counter() - t0
    extra = ["March 3rd, 2021", "3 march '21", "Tue Mar 2 2021", "2021.03.03", "12/25/1999", "the 1st of july 2030"]
    print("made-up inputs:")
    for s, g, b in zip(extra, trainer.greedy_decode(extra), trainer.beam_decode(extra, beam_size=4)):
        print(f"  {s!r:26} -> greedy {g!r:14} beam {b!r}")
    acc = m["exact_match"]
    print(f"RESULT seq2seq-dates: held-out exact match {acc * 100:.2f}% after {m['step']} steps "
          f"(goal >= {GOAL * 100:.0f}%: {'met' if acc >= GOAL else 'NOT met'}), {m['train_seconds']:.0f} s of "
          f"training, wall {wall:.0f} s; args: {' '.join(argv)}", flush=True)
    return m


if __name__ == "__main__":
    main()
