"""The main job on real input: pretraining on 44 real chest X-rays with their clinical notes."""

import math

import numpy as np
import torch

from msd_core.config import get_preset
from msd_core.train import load_model, train


def test_real_pairs_pretrain_with_accumulation(cxr_notes_manifest, tmp_path):
    config = get_preset("smoke", manifest=str(cxr_notes_manifest), output_dir=str(tmp_path / "run"),
                        micro_batch_size=4, accumulation_steps=2, max_steps=24, checkpoint_every=8,
                        lr=5e-3, warmup_steps=2, num_workers=0)

    history = train(config, progress=False)

    losses = np.array([record["loss"] for record in history.records])
    assert len(losses) == 24
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-5:].mean() < losses[:5].mean()
    model = load_model(tmp_path / "run")
    tokens = model.tokenize(["Bilateral patchy opacities."])
    with torch.no_grad():
        embedding = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert embedding.shape == (1, config.embed_dim)
