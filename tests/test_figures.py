"""Tests of earlyexit.analysis.figures: every figure is written, from real analysis outputs where cheap."""

from __future__ import annotations

import json

import pytest
import torch

from earlyexit import build_model
from earlyexit.analysis import (gradient_cosine_record, layer_information, layer_ranks, loss_surface,
                                plot_connectivity_plane, plot_gradient_cosines, plot_layer_information,
                                plot_layer_ranks, plot_loss_landscape)

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


@pytest.fixture(scope="module")
def model_and_batches():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=3, in_chans=1, image_size=8, width=16, depth=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    return model, batches


def test_rank_and_information_figures(tmp_path, model_and_batches):
    model, batches = model_and_batches
    ranks = layer_ranks(model, batches)
    assert plot_layer_ranks(ranks, tmp_path / "r.png") == tmp_path / "r.png" and _png(tmp_path / "r.png")
    plot_layer_ranks({"joint": ranks, "mixed": ranks[:-1]}, tmp_path / "r2.png", relative=True)
    assert _png(tmp_path / "r2.png")
    info = layer_information(model, batches, sigma=0.5, method="mc")
    plot_layer_information({"joint": info}, tmp_path / "i.png")
    assert _png(tmp_path / "i.png")
    plot_layer_information(info, tmp_path / "i.pdf")
    assert (tmp_path / "i.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_layer_ranks({"joint": []}, tmp_path / "x.png")


def test_gradient_cosine_figure_from_records_and_jsonl(tmp_path, model_and_batches):
    model, batches = model_and_batches
    records = []
    for phase, epochs in ((1, 1), (2, 2)):
        for epoch in range(1, epochs + 1):
            for step, (x, y) in enumerate(batches, 1):
                w = [0.0, 0.0, 1.0] if phase == 1 else None
                records.append(gradient_cosine_record(model, x, y, phase=phase, epoch=epoch, step=step, weights=w))
    assert records[0]["cos"][:2] == [None, None]  # phase 1: the ICs do not train, their entries are gaps
    plot_gradient_cosines(records, tmp_path / "c.png")
    assert _png(tmp_path / "c.png")
    log = tmp_path / "gradients.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_gradient_cosines(log, tmp_path / "c2.png")
    assert _png(tmp_path / "c2.png")
    with pytest.raises(ValueError, match="no gradient records"):
        plot_gradient_cosines([], tmp_path / "c3.png")
    with pytest.raises(ValueError, match="different numbers"):
        plot_gradient_cosines([{"phase": 1, "epoch": 1, "step": 1, "cos": [1.0]}, records[0]], tmp_path / "c3.png")


def test_plane_and_landscape_figures(tmp_path, model_and_batches):
    model, batches = model_and_batches
    xs = torch.linspace(-1.0, 3.0, 9)
    ys = torch.linspace(-0.5, 1.5, 7)
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    bowl = 0.1 + (X ** 2 + Y ** 2) * ((X - 2) ** 2 + Y ** 2)  # (9, 7), wide range: log-scaled levels
    plane = {"xs": xs.tolist(), "ys": ys.tolist(), "loss": bowl.double(),
             "exit_loss": torch.stack([bowl, 1 + 0 * bowl, bowl / 2]).double(),
             "coords": {"ref": (0.0, 0.0), "a": (2.0, 0.0), "b": (1.0, 1.0)}, "matched": True}
    plot_connectivity_plane(plane, tmp_path / "p.png", names={"ref": "joint", "a": "mixed", "b": "disjoint"})
    plot_connectivity_plane(plane, tmp_path / "p1.png", exit=1)  # a flat panel still draws
    assert _png(tmp_path / "p.png") and _png(tmp_path / "p1.png")
    two = loss_surface(model, batches, steps=(5, 5), span=0.5)
    plot_loss_landscape(two, tmp_path / "l2.png")
    one = loss_surface(model, batches, steps=5, direction="uniform")
    plot_loss_landscape(one, tmp_path / "l1.png")
    assert _png(tmp_path / "l2.png") and _png(tmp_path / "l1.png")


def test_png_figures_are_palette_images_that_match_the_full_colour_render(tmp_path):
    """Every PNG the package writes goes through ``figure_bytes``: a 256-colour palette image, smaller than
    matplotlib's RGBA file and equal to it to within a few levels per channel on almost every pixel."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from earlyexit.io import figure_bytes

    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xx, yy = np.meshgrid(np.linspace(-1, 1, 60), np.linspace(-1, 1, 60))
    ax.contourf(xx, yy, np.exp(3 * (xx ** 2 + yy ** 2)), levels=20)
    ax.fill_between([0, 1], [0, 0.5], [0.2, 0.9], alpha=0.3)
    ax.plot([-1, 1], [1, -1], label="curve")
    ax.legend()
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=100)
    packed = figure_bytes(fig, "png", dpi=100)
    with Image.open(io.BytesIO(packed)) as im:
        assert im.mode == "P"
        small = np.asarray(im.convert("RGB"), dtype=int)
    with Image.open(io.BytesIO(raw.getvalue())) as im:
        full = np.asarray(im.convert("RGB"), dtype=int)
    assert small.shape == full.shape and len(packed) < len(raw.getvalue())
    err = np.abs(small - full).max(axis=2)
    assert np.mean(err <= 8) > 0.99 and np.median(err) == 0
    assert figure_bytes(fig, "svg").lstrip().startswith(b"<?xml")  # other formats pass through
