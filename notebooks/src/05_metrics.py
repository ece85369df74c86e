# %% [markdown]
# # Metrics and the sanity check
#
# `camfn.metrics` scores maps: localisation against known boxes (pointing game, energy pointing game),
# faithfulness by perturbing the input (deletion, insertion, average drop, ROAD), and the model-randomisation
# sanity check. Every metric is a batched pure function returning one value per image.
#
# camfn ships a benchmark with known object boxes, `camfn.shapes`, and a small CNN trained on it, so the
# numbers below are real (on 16 test images at 64 px: a quick look, not a benchmark).

# %%
import torch
from IPython.display import display
from PIL import Image, ImageDraw

import camfn
from camfn import metrics, shapes, viz

model = shapes.load()
params = camfn.params(model)
test = shapes.make(16, seed=shapes.TEST_SEED)
methods = ["gradcam", "gradcampp", "layercam", "eigencam"]
maps = {name: camfn.METHODS[name](model, params, test.images, shapes.LAYER, test.labels) for name in methods}
axis = torch.linspace(-1, 1, 64)
centre = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / 0.5).expand(16, 64, 64)
maps["centre (baseline)"] = centre  # a map that ignores the image: what any method should beat
maps["random (baseline)"] = torch.rand(16, 64, 64, generator=torch.Generator().manual_seed(0))

# %% [markdown]
# ## Localisation and faithfulness
#
# Pointing game: is the map's maximum inside the object's box (grown by `shapes.tolerance(64)` = 4 px)?
# Energy pointing game: share of the map's mass inside the box. Deletion (lower is better) and insertion
# (higher is better): area under the class probability while the most salient pixels are removed from or
# copied onto the image. Average drop (lower is better): relative confidence lost on `x * map`.
# The perturbation metrics run once on all maps stacked along the batch (they are per-image functions).
# No single number ranks maps: the random map's low average drop shows how `x * map` rewards maps that keep
# some of every pixel.

# %%
names, n = list(maps), len(test.labels)
stacked = torch.cat(list(maps.values()))  # (maps x images, 64, 64)
images, labels = test.images.repeat(len(names), 1, 1, 1), test.labels.repeat(len(names))
deletion = metrics.deletion(model, params, images, stacked, labels, steps=8)
insertion = metrics.insertion(model, params, images, stacked, labels, steps=8)
drop = metrics.average_drop(model, params, images, stacked, labels)
print(f"{'map':<18} {'pointing':>8} {'energy':>7} {'deletion':>8} {'insertion':>9} {'avg drop':>8}")
for k, name in enumerate(names):
    part = slice(k * n, (k + 1) * n)
    values = (
        metrics.pointing_game(maps[name], test.boxes, shapes.tolerance(64)).float().mean(),
        metrics.energy_pointing_game(maps[name], test.boxes).mean(),
        deletion.auc[part].mean(),
        insertion.auc[part].mean(),
        drop[part].mean(),
    )
    print(f"{name:<18} " + " ".join(f"{float(v):>{w}.3f}" for v, w in zip(values, (8, 7, 8, 9, 8), strict=True)))
curves = {name: deletion.scores[k * n : (k + 1) * n].mean(0) for k, name in enumerate(names)}

# %% [markdown]
# ROAD (Rong et al., 2022) removes pixels and imputes them from their neighbours, so the model does not
# just react to the removal pattern. MoRF (most relevant first, lower is better), on 6 images:

# %%
for name in ["gradcam", "random (baseline)"]:
    road = metrics.road(model, params, test.images[:6], maps[name][:6], test.labels[:6], fractions=(0.2, 0.5))
    print(f"{name:<18} probability after removing 20% / 50%: {road.scores.mean(0).numpy().round(3)}")

# %% [markdown]
# The deletion curves (mean class probability against the fraction of pixels removed), drawn with PIL
# (matplotlib works as well; camfn does not need it):

# %%


def plot(curves: dict[str, torch.Tensor], size: tuple[int, int] = (420, 220)) -> Image.Image:
    """One curve (values at evenly spaced fractions) per map name, one colour each, with a legend."""
    width, height = size
    left, bottom, right, top = 30, height - 20, width - 130, 10
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text((left - 10, top - 4), "1", fill="black")
    draw.text((left - 10, bottom - 8), "0", fill="black")
    draw.text((right - 4, bottom + 4), "1", fill="black")
    draw.text((left + (right - left) // 2 - 60, bottom + 4), "fraction of pixels removed", fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f", "#bcbd22", "#9467bd", "#8c564b"]
    for k, (name, curve) in enumerate(curves.items()):
        fractions = torch.linspace(0, 1, len(curve))
        points = [
            (left + float(f) * (right - left), bottom - float(s) * (bottom - top))
            for f, s in zip(fractions, curve, strict=True)
        ]
        draw.line(points, fill=colours[k % len(colours)], width=2)
        draw.text((right + 8, top + 14 * k), name, fill=colours[k % len(colours)])
    return canvas


display(plot(curves))
pictures = [(im * shapes.STD + shapes.MEAN).clamp(0, 1) for im in test.images[:4]]
display(viz.grid(pictures, {name: m[:4] for name, m in maps.items()}, cell=64))

# %% [markdown]
# ## Sanity check (Adebayo et al., 2018)
#
# Randomise the model's layers one at a time from the top (cascading) and compare each map with the trained
# model's (Spearman rank correlation). A method that explains the *model* gives maps that decorrelate;
# one that only reflects the input (an edge detector) does not. All randomised parameter sets run in one
# `torch.func.vmap` call.

# %%
sample = test.images[:8]
check = metrics.sanity_check(camfn.gradcam, model, params, sample, shapes.LAYER, test.labels[:8], seed=0)
print("layers randomised, top first:", check.layers)
print("mean rank correlation:", [round(float(c), 2) for c in check.correlations.mean(1)])
steps = {f"top {i + 1}": check.maps[i, :2] for i in range(0, len(check.layers), 3)}
trained = {"trained": camfn.gradcam(model, params, sample[:2], shapes.LAYER, test.labels[:2])}
display(viz.grid([(im * shapes.STD + shapes.MEAN).clamp(0, 1) for im in sample[:2]], trained | steps, cell=64))
