"""Parameters of paper 18, declared once: params.yaml `papers.archetypal`."""

from __future__ import annotations

from common.kit.params import ImageDatasets, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """TopK vs A-SAE vs RA-SAE: stability across seeds / data halves, plausibility."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_train: PositiveInt = 2000
    """Train images per dataset (digits has 1438)"""
    n_test: PositiveInt = 1000
    """Test images per dataset (digits has 359)"""
    d_sae: PositiveInt = 128
    """Atoms, the same for every method"""
    k: PositiveInt = 8
    """Active latents per input (TopK, A-SAE and RA-SAE alike)"""
    n_candidates: PositiveInt = 256
    """K-means archetype candidates"""
    kmeans_iterations: PositiveInt = 10
    """Lloyd iterations for C"""
    ra_delta: PositiveFloat = 4.0
    """In normalised units"""
    steps: PositiveInt = 200
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.003
    nmf_max_iter: PositiveInt = 50
    """Multiplicative-update iterations of the NMF reference"""
    n_cone_points: PositiveInt = 256
    """Held-out points spanning the cone for the cone-cosine plausibility score"""
    cone_iterations: PositiveInt = 300
    """Projected-gradient iterations of that nonnegative least squares"""
    probe_alpha: PositiveFloat = 0.01
    n_grid_images: PositiveInt = 6
    """Top images per atom in the matched-atom grid"""
