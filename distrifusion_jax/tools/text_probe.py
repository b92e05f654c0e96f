"""Do a pipeline's text encoders carry what the demo captions say? A linear probe on their embeddings.

    python -m distrifusion_jax.tools.text_probe [--model demo] [--captions 3000]

Ridge regression (one-vs-rest, trained on 2/3 of the captions, scored on the rest) from the embeddings
the UNet sees to the first (largest) object's colour and position. It decided that the demo model keeps
its random text encoders frozen: the token sequence, which the UNet cross-attends to, separates both
perfectly (docs/demo-model.md), so training them would buy the UNet nothing it cannot learn itself.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..flags import run_command
from ..pipeline import DistriSDXLPipeline
from .command import parser, positive
from .demo_data import COLOURS, POSITIONS, make_example


def ridge_accuracy(x: np.ndarray, y: np.ndarray, classes: int, train: int, lam: float = 10.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardised features."""
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-6
    x = np.c_[(x - mean) / std, np.ones(len(x))]
    targets = np.eye(classes)[y[:train]]
    w = np.linalg.solve(x[:train].T @ x[:train] + lam * np.eye(x.shape[1]), x[:train].T @ targets)
    return float((np.argmax(x[train:] @ w, 1) == y[train:]).mean())


def probe(model: str = "demo", n: int = 3000) -> dict:
    """{features: (colour accuracy, position accuracy)} plus the majority-class baselines."""

    pipe = DistriSDXLPipeline.from_pretrained(model, dtype=jnp.float32)
    captions, colour, position = [], [], []
    for seed in range(n):
        _, text, scene = make_example(seed, 32)  # the caption and scene; the picture is not needed
        captions.append(text)
        colour.append(list(COLOURS).index(scene.objects[0].colour))
        position.append(list(POSITIONS).index(scene.objects[0].position))
    seqs, pooled = [], []
    for i in range(0, n, 100):
        e, p = pipe.prompt_encoder.encode(captions[i : i + 100], captions[i : i + 100])
        seqs.append(np.asarray(e))
        pooled.append(np.asarray(p))
    seqs, pooled = np.concatenate(seqs), np.concatenate(pooled)
    colour, position, train = np.asarray(colour), np.asarray(position), 2 * n // 3
    features = {
        f"pooled embedding ({pooled.shape[1]})": pooled,
        f"tokens 1-8 of the sequence (8 x {seqs.shape[2]})": seqs[:, 1:9].reshape(n, -1),
        f"mean over the sequence ({seqs.shape[2]})": seqs.mean(1),
    }
    out = {
        name: (
            ridge_accuracy(x, colour, len(COLOURS), train),
            ridge_accuracy(x, position, len(POSITIONS), train),
        )
        for name, x in features.items()
    }
    out["majority class"] = (np.bincount(colour).max() / n, np.bincount(position).max() / n)
    return out


def run(args) -> None:
    print(f"{'features':<40} colour  position  (held-out accuracy, {args.captions // 3} captions)")
    for name, (c, p) in probe(args.model, args.captions).items():
        print(f"{name:<40} {c:6.3f}  {p:8.3f}")


def main(argv=None) -> int:
    p = parser(__doc__, "text_probe")
    p.add_argument("--model", default="demo", help="pipeline folder or 'demo' (default)")
    p.add_argument("--captions", type=positive, default=3000, help="captions probed (default 3000)")
    return run_command(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
