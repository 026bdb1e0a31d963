"""Synthetic MOSI-shaped data with planted multimodal structure and a known oracle.

Real corpora cannot tell us how much of the attainable a model reaches; this generator can. Each sample
has a sentiment score built from latent factors, and each modality expresses some of them:

- a shared factor `z_c`, expressed in every modality (what the modality-independent encoder should find);
- one specific factor per modality (`z_t`, `z_a`, `z_v`), visible in that modality only;
- a per-sample, per-modality nuisance vector ("speaker"), large in variance, unrelated to the label;
- cue steps: only about a third of a sample's valid steps carry its factors, and they carry a marker;
  the other (distractor) steps carry fresh random values along the same directions, so they look like
  sentiment but say nothing about the label (what AMSA should learn to mask);
- unequal strength: text expresses its factors clearly, audio and vision weakly and noisily;
- variable lengths, zero padding after each sample's length (per modality when unaligned).

The score is s = clip(z_c + 0.5 z_t + 0.6 z_a + 0.6 z_v, -3, 3). Labels imitate MOSI's: the mean of 3 or 5
integer ratings in [-3, 3] (so multiples of 1/3 or 0.2, some exactly 0), each rating the rounded score
plus rater noise and a per-sample shared noise. The noiseless score is the oracle prediction: its test
metrics (about 0.90 Non0 Acc-2, MAE about 0.43) bound what any model can reach. A text-side oracle that
knows only z_c and z_t reaches about 11 points less Non0 Acc-2, so no single modality suffices. The
features reveal the factors only up to their noise: a ridge read-out of pooled features that is told which
steps are cues reaches 0.83-0.84 Non0 Acc-2 (MAE 0.61) on the default data, mean pooling over all valid
steps without that knowledge 0.75-0.76 (MAE 0.80-0.81) (bench/readouts.py, seeds 1111 and 2222).
All of it is deterministic from `data.seed`; each split draws from its own child seed, so changing one
split's size leaves the others unchanged. Nothing in it goes through BLAS or LAPACK (no matmul, norm or QR):
their kernels round differently on different CPUs, while elementwise arithmetic and numpy's own sums give
the same bits everywhere, and the prepared files must have the same bytes on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdkat import MODALITIES
from mdkat.config import DataConfig
from mdkat.data.prepared import SPLITS, DataError, SplitArrays
from mdkat.metrics import regression_metrics

# Label weights of the factors [shared, text, audio, vision] and the rater model, calibrated (10^5-sample
# simulation) for full oracle Non0 Acc-2 ~0.90 / MAE ~0.44 and a text-side oracle ~12 points below.
FACTOR_WEIGHTS = np.array([1.0, 0.5, 0.6, 0.6])
RATER_NOISE = 1.0  # std of one rater's disagreement, before rounding to an integer
SHARED_LABEL_NOISE = 0.2  # std of noise common to all raters of a sample
CUE_PROBABILITY = 0.3  # fraction of valid steps that carry the sample's factors
MIN_TEXT_LEN = 10  # shortest utterance, in text steps


@dataclass(frozen=True)
class ModalityStyle:
    """How strongly and how noisily one modality expresses the factors."""

    gain: float  # amplitude of the factors along their directions, on cue and distractor steps
    marker: float  # amplitude of the cue marker on cue steps
    noise: float  # std of per-dimension noise on every valid step
    nuisance_rank: int  # dimensions of the speaker-like nuisance subspace
    nuisance_std: float  # its per-dimension std: large, so that it dominates the raw variance


STYLES = {
    "text": ModalityStyle(gain=1.0, marker=1.0, noise=0.5, nuisance_rank=16, nuisance_std=2.0),
    "audio": ModalityStyle(gain=0.6, marker=0.7, noise=1.0, nuisance_rank=2, nuisance_std=2.0),
    "vision": ModalityStyle(gain=0.6, marker=0.7, noise=1.0, nuisance_rank=4, nuisance_std=2.0),
}


@dataclass(frozen=True)
class Directions:
    """The fixed 'vocabulary' of one modality: where each factor lives in feature space."""

    shared: np.ndarray  # (d,) unit vector of z_c
    specific: np.ndarray  # (d,) unit vector of this modality's own factor
    marker: np.ndarray  # (d,) unit vector present on cue steps
    nuisance: np.ndarray  # (d, r) basis of the speaker-like subspace


@dataclass
class SplitTruth:
    """What generated one split: latent factors, cue masks and the two oracle predictions."""

    factors: np.ndarray  # (N, 4) z_c, z_t, z_a, z_v
    cue: dict[str, np.ndarray]  # modality -> (N, T_m) bool, True on cue steps (never on padding)
    oracle: np.ndarray  # (N,) noiseless score: the best possible prediction
    text_oracle: np.ndarray  # (N,) the score from the text-side factors z_c, z_t only
    raters: np.ndarray  # (N,) 3 or 5


@dataclass
class Synthetic:
    """Generated splits in the prepared format, their ground truth, and the manifest info."""

    splits: dict[str, SplitArrays]
    truth: dict[str, SplitTruth]
    info: dict


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.standard_normal(d)
    return (v / np.sqrt(np.sum(v * v))).astype(np.float32)


def _orthonormal_basis(a: np.ndarray) -> np.ndarray:
    """The Q of a's reduced QR factorisation, (d, r) with d >= r, by Householder reflections.

    The signs are LAPACK's (each reflection maps its column onto minus the sign of its pivot), so that the
    basis is the one np.linalg.qr gave, up to rounding.
    """
    d, r = a.shape
    a = a.copy()
    reflections = []
    for k in range(r):
        x = a[k:, k]
        alpha, tail = x[0], np.sum(x[1:] * x[1:])
        if tail == 0:  # already on its axis: LAPACK leaves the column as it is
            reflections.append((0.0, x))
            continue
        norm = np.sqrt(alpha * alpha + tail)
        beta = -norm if alpha >= 0 else norm
        v = x / (alpha - beta)
        v[0] = 1.0
        tau = (beta - alpha) / beta
        a[k:, k + 1 :] -= (tau * v)[:, None] * np.sum(v[:, None] * a[k:, k + 1 :], axis=0)
        reflections.append((tau, v))
    q = np.eye(d, r)
    for k in reversed(range(r)):
        tau, v = reflections[k]
        q[k:, k:] -= (tau * v)[:, None] * np.sum(v[:, None] * q[k:, k:], axis=0)
    return q


def _directions(rng: np.random.Generator, d: int, rank: int) -> Directions:
    basis = _orthonormal_basis(rng.standard_normal((d, min(rank, d)))).astype(np.float32)
    return Directions(_unit(rng, d), _unit(rng, d), _unit(rng, d), basis)


def _weighted_sum(columns: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum over k of columns[..., k] * weights[..., k] (broadcast), one term at a time from k = 0."""
    total = columns[..., 0] * weights[..., 0]
    for k in range(1, weights.shape[-1]):
        total = total + columns[..., k] * weights[..., k]
    return total


def _labels(rng: np.random.Generator, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(score)
    raters = np.where(rng.random(n) < 0.5, 3, 5)  # (N,)
    noise = rng.standard_normal((n, 5)) * RATER_NOISE + rng.standard_normal((n, 1)) * SHARED_LABEL_NOISE
    ratings = np.clip(np.round(score[:, None] + noise), -3, 3)  # (N, 5) integers
    used = np.arange(5)[None, :] < raters[:, None]
    return (ratings * used).sum(1) / raters, raters


def _lengths_and_cues(
    rng: np.random.Generator, n: int, steps: dict[str, int], aligned: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    t_text = steps["text"]
    text_len = rng.integers(min(MIN_TEXT_LEN, t_text), t_text + 1, size=n)  # (N,)
    pos = np.arange(t_text)[None, :]
    cue_text = (rng.random((n, t_text)) < CUE_PROBABILITY) & (pos < text_len[:, None])
    # every utterance carries at least one cue, so every label is expressed somewhere
    forced = (rng.random(n) * text_len).astype(np.int64)
    cue_text[np.arange(n), forced] = True
    lengths, cues = {"text": text_len}, {"text": cue_text}
    for m in ("audio", "vision"):
        if aligned:
            lengths[m], cues[m] = text_len.copy(), cue_text.copy()
            continue
        # a modality on its own clock: proportionally more steps, with per-sample jitter in the rate
        rate = steps[m] / t_text * rng.uniform(0.9, 1.1, size=n)
        length = np.clip(np.round(text_len * rate), 1, steps[m]).astype(np.int64)
        j = np.arange(steps[m])[None, :]
        src = np.minimum(j * text_len[:, None] // length[:, None], t_text - 1)  # (N, T_m) text step of step j
        cues[m] = np.take_along_axis(cue_text, src, axis=1) & (j < length[:, None])
        lengths[m] = length
    return lengths, cues


def _features(
    rng: np.random.Generator,
    style: ModalityStyle,
    dirs: Directions,
    length: np.ndarray,
    cue: np.ndarray,
    z_shared: np.ndarray,
    z_own: np.ndarray,
) -> np.ndarray:
    n, t = cue.shape
    d = dirs.shared.shape[0]
    x = rng.standard_normal((n, t, d), dtype=np.float32) * np.float32(style.noise)  # (N, T, d)
    fake = rng.standard_normal((n, t, 2), dtype=np.float32)  # distractor values, independent of the label
    shared = np.where(cue, z_shared[:, None], fake[..., 0]).astype(np.float32)  # (N, T)
    own = np.where(cue, z_own[:, None], fake[..., 1]).astype(np.float32)  # (N, T)
    x += np.float32(style.gain) * (shared[..., None] * dirs.shared + own[..., None] * dirs.specific)
    x += np.float32(style.marker) * cue[..., None].astype(np.float32) * dirs.marker
    speaker = rng.standard_normal((n, dirs.nuisance.shape[1]), dtype=np.float32) * np.float32(
        style.nuisance_std
    )
    # (N, 1, d): the same on every step of a sample
    x += _weighted_sum(dirs.nuisance, speaker[:, None, :])[:, None, :]
    x *= (np.arange(t)[None, :] < length[:, None])[..., None]  # zero padding
    return x


def _split(
    rng: np.random.Generator,
    split: str,
    n: int,
    steps: dict[str, int],
    aligned: bool,
    world: dict[str, Directions],
) -> tuple[SplitArrays, SplitTruth]:
    factors = rng.standard_normal((n, 4))  # (N, 4)
    score = np.clip(_weighted_sum(factors, FACTOR_WEIGHTS), -3, 3)
    text_score = np.clip(_weighted_sum(factors[:, :2], FACTOR_WEIGHTS[:2]), -3, 3)
    label, raters = _labels(rng, score)
    lengths, cues = _lengths_and_cues(rng, n, steps, aligned)
    arrays: SplitArrays = {}
    for i, m in enumerate(MODALITIES):
        arrays[m] = _features(rng, STYLES[m], world[m], lengths[m], cues[m], factors[:, 0], factors[:, 1 + i])
        arrays[f"{m}_len"] = lengths[m].astype(np.int64)
    arrays["label"] = label.astype(np.float32)
    arrays["id"] = np.array([f"synthetic_{split}_{i:05d}" for i in range(n)])
    truth = SplitTruth(factors, cues, score, text_score, raters)
    return arrays, truth


def generate(cfg: DataConfig) -> Synthetic:
    """Generate the three splits of synthetic data described by `cfg` (deterministic from `cfg.seed`)."""
    syn = cfg.synthetic
    sizes = {"train": syn.n_train, "valid": syn.n_valid, "test": syn.n_test}
    for split, n in sizes.items():
        if n < 1:
            raise DataError(f"data.synthetic.n_{split}: expected a positive number of samples, got {n}")
    dims = {m: getattr(syn.dims, m) for m in MODALITIES}
    steps = {"text": cfg.seq_len, "audio": cfg.seq_len, "vision": cfg.seq_len}
    if not syn.aligned:
        steps.update(audio=syn.unaligned_len.audio, vision=syn.unaligned_len.vision)
    for key, value in [
        *((f"dims.{m}", v) for m, v in dims.items()),
        *((f"steps.{m}", v) for m, v in steps.items()),
    ]:
        if value < 1:
            raise DataError(f"data.synthetic.{key}: expected a positive integer, got {value}")

    world_seed, *split_seeds = np.random.SeedSequence(cfg.seed).spawn(1 + len(SPLITS))
    world_rng = np.random.default_rng(world_seed)
    world = {m: _directions(world_rng, dims[m], STYLES[m].nuisance_rank) for m in MODALITIES}
    splits, truth = {}, {}
    for split, seed in zip(SPLITS, split_seeds, strict=True):
        splits[split], truth[split] = _split(
            np.random.default_rng(seed), split, sizes[split], steps, syn.aligned, world
        )

    test = splits["test"]["label"]
    info = {
        "source": "synthetic",
        "dataset": "synthetic",
        "aligned": syn.aligned,
        "seed": cfg.seed,
        "oracle": {
            "split": "test",
            "full": regression_metrics(truth["test"].oracle, test),
            "text_only": regression_metrics(truth["test"].text_oracle, test),
        },
    }
    return Synthetic(splits, truth, info)


def load(cfg: DataConfig) -> tuple[dict[str, SplitArrays], dict]:
    """The `synthetic` data source of `prepare`: the generated splits and their manifest info."""
    generated = generate(cfg)
    return generated.splits, generated.info
