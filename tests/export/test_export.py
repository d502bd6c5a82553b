"""collafuse export and CollaFusePipeline on tiny trained runs: the folder diffusers expects, the same tensors as the
project's own sampler (through the split's roles and transport), what each party's export holds, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tomli_w
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from collafuse.cli import main
from collafuse.config import ConfigError
from collafuse.data.images import to_uint8
from collafuse.export import CollaFusePipeline, export_run
from collafuse.split.runner import load_run
from conftest import TINY, merge


def _train(tmp_path, idx_dataset, name="run", **sections):
    toml = tmp_path / f"{name}.toml"
    toml.write_text(tomli_w.dumps(merge(merge(TINY, {"data": {"root": str(idx_dataset)}}), sections)))
    out = tmp_path / name
    assert main(["run", str(toml), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("cut,sampler", [(6, "dpmsolver"), (6, "ddim"), (0, "dpmsolver"), (20, "dpmsolver")])
def test_the_pipeline_draws_the_same_tensors_as_the_split_sampler(tmp_path, idx_dataset, cut, sampler):
    run = _train(tmp_path, idx_dataset, split={"cut": cut}, sample={"sampler": sampler})
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    fed = load_run(run)
    held = [int(v) for v in fed.clients[1].data.train_y.unique()]
    labels = torch.tensor(held[:2]).repeat_interleave(3)  # 6 images: two batches of sample.batch_size = 4
    reference = fed.sample(1, len(labels), labels=labels, seed=11)["x0"]

    pipe = CollaFusePipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(client=1, class_labels=labels.tolist(), generator=torch.Generator().manual_seed(11), output_type="pt")
    assert torch.equal(got.images, reference)
    assert torch.equal(got.labels, labels)
    pil = pipe(client=1, class_labels=labels.tolist(), generator=torch.Generator().manual_seed(11)).images
    assert np.array_equal(np.stack([np.asarray(im) for im in pil])[:, None], to_uint8(reference))
    # another seed gives other images: the generator is what drives them
    other = pipe(client=1, class_labels=labels.tolist(), generator=torch.Generator().manual_seed(12), output_type="pt")
    assert not torch.equal(other.images, reference)


def test_the_folder_is_what_diffusers_expects_and_the_card_says_what_it_holds(tmp_path, idx_dataset):
    run = _train(tmp_path, idx_dataset)
    info = export_run(run, tmp_path / "export")
    export = tmp_path / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "CollaFusePipeline"
    assert index["server"] == index["client_0"] == index["client_1"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    for part in ("server", "client_0", "client_1"):
        assert (export / part / "diffusion_pytorch_model.safetensors").is_file()
    # The weights are the EMA copy the project samples with, loaded by diffusers itself.
    fed = load_run(run)
    unet = UNet2DModel.from_pretrained(export / "client_1")
    ema = fed.clients[1].learner.sampling_model(True).state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in unet.state_dict().items())
    card = (export / "README.md").read_text()
    classes = sorted(int(v) for v in fed.clients[0].data.train_y.unique())
    assert f"| 0 | 6 | {classes} |" in card and "collafuse run" in card and "pipe.finish" in card
    assert info["bytes"] == sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    # An existing folder is never overwritten.
    with pytest.raises(ConfigError, match="exists"):
        export_run(run, export)


def test_each_party_exports_only_its_own_model_and_a_client_alone_can_only_finish_handoffs(tmp_path, idx_dataset):
    run = _train(tmp_path, idx_dataset)
    export_run(run, tmp_path / "all")
    export_run(run, tmp_path / "server", party="server")
    export_run(run, tmp_path / "client1", party=1)
    assert not list((tmp_path / "server").glob("client_*")) and (tmp_path / "server" / "server").is_dir()
    assert sorted(p.name for p in (tmp_path / "client1").iterdir() if p.is_dir()) == ["client_1", "scheduler"]

    full = CollaFusePipeline.from_pretrained(tmp_path / "all")
    alone = CollaFusePipeline.from_pretrained(tmp_path / "client1")
    for p in (full, alone):
        p.set_progress_bar_config(disable=True)
    y = [int(v) for v in load_run(run).clients[1].data.train_y.unique()][:1] * 3
    with pytest.raises(ConfigError, match="finish"):
        alone(client=1, class_labels=y)
    with pytest.raises(ConfigError, match="not in this export"):
        alone(client=0, class_labels=y)
    drawn = full(client=1, class_labels=y, generator=torch.Generator().manual_seed(5), output_type="pt")
    # Finishing the server's hand-offs alone: the same images, with the client's share of the generator's draws.
    g = torch.Generator().manual_seed(5)
    full._server_to_cut(full.cfg, torch.tensor(y), 1, g)
    finished = alone.finish(1, drawn.x_cut, y, g)
    assert torch.equal(finished, drawn.images)


def test_bad_requests_get_one_line_errors(tmp_path, idx_dataset, capsys):
    run = _train(tmp_path, idx_dataset)
    export_run(run, tmp_path / "export")
    pipe = CollaFusePipeline.from_pretrained(tmp_path / "export")
    held = set(int(v) for v in load_run(run).clients[0].data.train_y.unique())
    never = min(set(range(10)) - held)
    for kwargs, key in [({"client": 0, "class_labels": [never]}, "class_labels"),
                        ({"client": 5, "class_labels": [0]}, "client = 5"),
                        ({"client": 0, "class_labels": []}, "class_labels = []"),
                        ({"client": 0, "class_labels": [min(held)], "num_inference_steps": 0}, "num_inference_steps"),
                        ({"client": 0, "class_labels": [min(held)], "output_type": "jpg"}, "output_type"),
                        ({"client": 0, "class_labels": [min(held)], "sampler": "euler"}, "sampler = 'euler'")]:
        with pytest.raises(ConfigError, match=re.escape(key)) as e:
            pipe(**kwargs)
        assert "\n" not in str(e.value) and "allowed" in str(e.value)
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--party", "7"]) == 2
    assert "party = 7 is invalid" in capsys.readouterr().err


def test_collafuse_sample_draws_a_users_request_to_png_or_safetensors(tmp_path, idx_dataset, capsys):
    run = _train(tmp_path, idx_dataset)
    fed = load_run(run)
    a, b = sorted(int(v) for v in fed.clients[0].data.train_y.unique())[:2]
    out = tmp_path / "mine.safetensors"
    assert main(["sample", str(run), "--client", "0", "--labels", f"{a}:3,{b}:2", "--sampler", "ddim", "--steps", "4",
                 "--seed", "9", "--out", str(out), "--quiet"]) == 0
    saved = load_file(str(out))
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (5, 1, 28, 28)
    assert saved["labels"].tolist() == [a, a, a, b, b]
    # The same request through the pipeline, with the same sampler and steps, gives the same bytes.
    export_run(run, tmp_path / "export")
    pipe = CollaFusePipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    np_images = pipe(client=0, class_labels=[a, a, a, b, b], num_inference_steps=4, sampler="ddim",
                     generator=torch.Generator().manual_seed(9), output_type="np").images
    assert np.array_equal(np_images.transpose(0, 3, 1, 2), saved["images"].numpy())

    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--client", "1", "--n", "4", "--out", str(grid), "--quiet"]) == 0
    assert grid.is_file()
    capsys.readouterr()
    never = min(set(range(10)) - set(fed.clients[0].data.train_y.unique().tolist()))
    for argv, key in [(["--client", "3", "--n", "2"], "--client = 3"),
                      (["--client", "0", "--labels", f"{never}:2"], f"--labels class {never}"),
                      (["--client", "0", "--n", "0"], "--n = 0"),
                      (["--client", "0", "--labels", f"{a}:0"], "--labels count 0"),
                      (["--client", "0", "--labels", "x:1"], "--labels item 'x:1'"),
                      (["--client", "0", "--n", "2", "--labels", f"{a}:1"], "--n and --labels"),
                      (["--client", "0", "--n", "2", "--steps", "0"], "--steps = 0")]:
        assert main(["sample", str(run), *argv, "--out", str(tmp_path / "bad.png"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert key in err and len(err.splitlines()) == 1, err
