"""Noise-augmented training and model-card checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import certlib.training.train as train_module
from certlib.certificates import dssn_radius
from certlib.checkpoints.checkpoint import CardMismatch, load_checkpoint, read_card, save_checkpoint
from certlib.data import QuantizedDataset, load_cifar10, load_digits, load_imagenet
from certlib.engine.voting import stream_seed
from certlib.families import DSSNNoise, make_noise
from certlib.models import build_model
from certlib.smooth import Smooth
from certlib.training.config import TrainConfig
from certlib.training.step import augment, stability_loss
from tests.helpers import quiet, random_checkpoint


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def epoch_losses(train_model, config, path, train_set, test_set):
    losses = []
    card = train_model(config, path, train_set, test_set, log=quiet, on_epoch=lambda m: losses.append(m["loss"]))
    return losses, card


@pytest.mark.parametrize(
    "method,training",
    [
        ("dssn", "standard"),
        ("uniform", "stability"),
        ("gaussian", "standard"),
        ("laplace", "standard"),
        ("ssn", "stability"),
    ],
)
def test_training_reduces_the_loss_on_digits(train_model, digits, tmp_path, method, training):
    losses, card = epoch_losses(
        train_model, TrainConfig("digits", method, 0.25, training=training, epochs=4), tmp_path / "m.pt", *digits
    )
    assert losses[-1] < losses[0]
    assert card.method == method and card.training == training and card.epochs_done == 4


def test_training_reduces_the_loss_on_cifar10(train_model, cifar10_dir, tmp_path):
    train_set = load_cifar10(cifar10_dir, "train").subset(np.arange(512))
    test_set = load_cifar10(cifar10_dir, "test").subset(np.arange(128))
    config = TrainConfig("cifar10", "dssn", 0.25, architecture="small_cnn", epochs=3, lr=0.02)
    losses, card = epoch_losses(train_model, config, tmp_path / "c.pt", train_set, test_set)
    assert losses[-1] < losses[0]
    assert card.levels == 220 and card.input_shape == [3, 32, 32] and card.heldout == "test[:128]"


def test_dssn_training_uses_the_papers_offset_vector(train_model, digits, tmp_path, monkeypatch):
    made = []
    real_make_noise = train_module.make_noise

    def spy(*args, **kwargs):
        made.append(real_make_noise(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_module, "make_noise", spy)
    calls = []
    real_sample = DSSNNoise.sample_grid
    monkeypatch.setattr(
        DSSNNoise, "sample_grid", lambda self, x, q, g=None: calls.append(1) or real_sample(self, x, q, g)
    )
    train_model(TrainConfig("digits", "dssn", 0.5, seed=3, epochs=1), tmp_path / "m.pt", *digits, log=quiet)
    noise = made[0]
    assert isinstance(noise, DSSNNoise) and noise.seed == 3 and noise.q == 16
    np.testing.assert_array_equal(noise.offset_vector(64), np.random.RandomState(3).randint(noise.levels, size=64))
    assert len(calls) >= math.ceil(len(digits[0]) / 64)


def test_stability_loss_hand_checked():
    logits_1 = torch.tensor([[1.0, 0.0]])
    logits_2 = torch.tensor([[0.0, 0.0]])
    p = math.e / (math.e + 1)
    cross_entropy = -math.log(p)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    got = stability_loss(logits_1, logits_2, torch.tensor([0]), 6.0)
    assert float(got) == pytest.approx(cross_entropy + 6 * kl, rel=1e-6)
    assert float(got) == pytest.approx(0.9789, abs=5e-4)
    # Identical predictions: only the cross-entropy remains.
    assert float(stability_loss(logits_1, logits_1, torch.tensor([1]), 6.0)) == pytest.approx(
        -math.log(1 - p), rel=1e-6
    )


def test_augment_keeps_the_grid():
    x = torch.randint(0, 256, (16, 3, 32, 32)).float() / 255
    out = augment(x, torch.Generator().manual_seed(0), 4, True)
    assert out.shape == x.shape
    torch.testing.assert_close(torch.round(out * 255) / 255, out)
    assert not torch.equal(out, x)


def test_model_card_round_trip_and_refusals(trained_digits_dssn, tmp_path):
    path, card = trained_digits_dssn
    payload = torch.load(path, weights_only=True)  # tensors and a JSON string only
    assert set(payload) == {"card", "state_dict"} and isinstance(payload["card"], str)
    assert read_card(path) == card
    assert card.levels == 27 and card.lam == 27 / 32 and card.q == 16 and card.dataset == "digits"
    assert 0 <= card.noisy_accuracy <= 1 and 0 <= card.clean_accuracy <= 1 and len(card.weights_sha256) == 64

    model, loaded = load_checkpoint(path, method="dssn", sigma=0.5, seed=0, q=16, dataset="digits")
    assert loaded == card and not model.training
    with pytest.raises(CardMismatch, match="sigma: trained at 0.5, certifying at 0.25"):
        load_checkpoint(path, method="dssn", sigma=0.25)
    with pytest.raises(CardMismatch, match="seed: the dssn model was trained with seed 0, certifying with 2"):
        load_checkpoint(path, method="dssn", seed=2)
    with pytest.raises(CardMismatch, match="q: the dssn model was trained with q 16, certifying with 255"):
        load_checkpoint(path, method="dssn", q=255)
    load_checkpoint(path, method="dssn", sigma=0.5, override=True, seed=2)
    with pytest.raises(CardMismatch, match="noise"):
        load_checkpoint(path, method="uniform")
    with pytest.raises(CardMismatch, match="dataset"):
        load_checkpoint(path, dataset="cifar10")
    load_checkpoint(path, method="uniform", override=True)

    payload["state_dict"]["1.net.0.bias"][0] += 1  # tamper with the weights
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no model card"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_checkpoint_is_atomic(trained_digits_dssn, tmp_path):
    trained, card = trained_digits_dssn
    assert sorted(p.name for p in trained.parent.iterdir()) == [trained.name]  # training left no resume state
    path = Path(shutil.copy(trained, tmp_path / "m.pt"))
    model, _ = load_checkpoint(path)
    save_checkpoint(path, model, card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary files


@pytest.mark.parametrize(
    "arch,shape",
    [("wrn40_2", (3, 32, 32)), ("resnet110", (3, 32, 32)), ("resnet50", (3, 64, 64)), ("small_cnn", (1, 8, 8))],
)
def test_every_architecture_round_trips_through_a_checkpoint(arch, shape, tmp_path):
    # BatchNorm's 0-dim num_batches_tracked once made hashing fail after the last training epoch.
    data = SimpleNamespace(
        name="cifar10",
        num_classes=10,
        class_names=[str(c) for c in range(10)],
        q=255,
        mean=[0.5] * shape[0],
        std=[0.25] * shape[0],
        input_shape=shape,
    )
    path = random_checkpoint(tmp_path / "m.pt", data, "dssn", 0.5, seed=3, architecture=arch)
    model, card = load_checkpoint(path, method="dssn", sigma=0.5, seed=3)
    torch.manual_seed(3)
    original = build_model(arch, 10, data.mean, data.std, shape).state_dict()
    assert card.architecture == arch and model.state_dict().keys() == original.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def reference_training(config: TrainConfig, train_set) -> dict:
    """The papers' training loop written plainly (batches pulled from host memory, noise on
    pixel floats, SGD's own momentum initialisation), with train_model's random streams."""
    cfg = config.resolved()
    noise = make_noise(cfg.method, cfg.sigma, q=train_set.q, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.architecture, train_set.num_classes, train_set.mean, train_set.std, train_set.input_shape)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    model.train()
    for epoch in range(cfg.epochs):
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, epoch, 2, 0))
        order = torch.randperm(len(train_set), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = augment(train_set.pixels(idx), generator, cfg.crop_padding, cfg.flip)
            logits = model(noise.sample(x, generator))
            if cfg.training == "stability":
                loss = stability_loss(
                    logits, model(noise.sample(x, generator)), train_set.labels[idx], cfg.stability_weight
                )
            else:
                loss = torch.nn.functional.cross_entropy(logits, train_set.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.state_dict()


@pytest.mark.parametrize("method,training", [("dssn", "standard"), ("gaussian", "stability"), ("laplace", "standard")])
def test_the_training_step_keeps_the_papers_math(train_model, digits, tmp_path, method, training):
    """Device-resident batches, integer-grid augmentation, grid noise and on-device metrics
    give, on a CPU, exactly the weights of the plain loop."""
    config = TrainConfig("digits", method, 0.5, seed=4, epochs=2, training=training, heldout_limit=8)
    expected = reference_training(config, digits[0])
    train_model(config, tmp_path / "m.pt", *digits, device="cpu", log=quiet)
    model, _ = load_checkpoint(tmp_path / "m.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_workers_decoding_batches_train_the_same_model_as_resident_data(train_model, digits, tmp_path):
    config = TrainConfig("digits", "uniform", 0.5, seed=2, epochs=2, heldout_limit=8)
    resident = train_model(config, tmp_path / "a.pt", *digits, device="cpu", log=quiet)
    loaded = train_model(
        dataclasses.replace(config, data="loader", loader_workers=2),
        tmp_path / "b.pt",
        *digits,
        device="cpu",
        log=quiet,
    )
    assert loaded.weights_sha256 == resident.weights_sha256


def write_image_folder(root: Path, split: str, classes: int, per_class: int, seed: int) -> None:
    """An ImageNet-layout folder root/<split>/<wnid>/*.JPEG of random images of varied sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(230, 300, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.JPEG")


def test_resnet50_trains_from_an_imagenet_folder_through_dataloader_workers(train_model, tmp_path):
    """ImageNet does not fit on a device: DataLoader worker processes decode its JPEGs. The
    model equals one trained on the same decoded images held in memory."""
    write_image_folder(tmp_path / "imagenet", "train", classes=2, per_class=4, seed=0)
    write_image_folder(tmp_path / "imagenet", "val", classes=2, per_class=1, seed=1)
    train_set, heldout = load_imagenet(tmp_path / "imagenet", "train"), load_imagenet(tmp_path / "imagenet", "val")
    config = TrainConfig("imagenet", "gaussian", 0.25, seed=1, epochs=1, batch_size=4, loader_workers=2)
    lines = []
    streamed = train_model(config, tmp_path / "streamed.pt", train_set, heldout, device="cpu", log=lines.append)
    assert (
        streamed.architecture == "resnet50" and streamed.input_shape == [3, 224, 224] and streamed.heldout == "val[:2]"
    )
    in_memory = QuantizedDataset(
        "imagenet",
        "train",
        train_set.grid_values(range(len(train_set))),
        train_set.labels,
        255,
        train_set.class_names,
        train_set.mean,
        train_set.std,
    )  # the same images, decoded up front
    held = train_model(config, tmp_path / "held.pt", in_memory, heldout, device="cpu", log=quiet)
    assert held.weights_sha256 == streamed.weights_sha256


def test_resume_after_interruption_gives_the_same_weights(train_model, digits, tmp_path):
    """Deterministic kernels: bit-identical weights on a GPU as well as on a CPU (where every
    kernel is deterministic anyway); runs on the GPU where there is one."""
    config = TrainConfig("digits", "dssn", 0.5, seed=4, epochs=3, training="stability", deterministic=True)
    straight = train_model(config, tmp_path / "a.pt", *digits, log=quiet)

    class Interrupted(Exception):
        pass

    def stop_after_two(metrics):
        if metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_model(config, tmp_path / "b.pt", *digits, log=quiet, on_epoch=stop_after_two)
    with pytest.raises(ValueError, match="different training configuration"):
        train_model(TrainConfig("digits", "dssn", 0.5, seed=5, epochs=3), tmp_path / "b.pt", *digits, log=quiet)
    lines = []
    resumed = train_model(config, tmp_path / "b.pt", *digits, log=lines.append)
    assert lines[0].startswith("resuming b.pt after epoch 2/3")
    assert resumed.weights_sha256 == straight.weights_sha256
    assert not (tmp_path / "b.pt.state").exists()


def test_bad_training_configs_are_refused(digits, tmp_path):
    """Refused before the first epoch: without the training fixture, an epoch would fail the test."""
    with pytest.raises(ValueError, match="training must be"):
        train_module.train_model(TrainConfig("digits", "dssn", 0.5, training="adversarial"), tmp_path / "m.pt", *digits)
    with pytest.raises(ValueError, match="epochs"):
        train_module.train_model(TrainConfig("digits", "dssn", 0.5, epochs=0), tmp_path / "m.pt", *digits)
    with pytest.raises(ValueError, match="sigma"):
        train_module.train_model(TrainConfig("digits", "dssn", -1.0, epochs=1), tmp_path / "m.pt", *digits)


def test_a_training_steps_flops_are_counted_once_per_architecture_and_dataset(monkeypatch):
    """3x the forward pass (counted on the meta device) for each noisy copy of each image: the
    WRN-40-2 CIFAR-10 step at batch 256 that the pool's packing rule was measured with, doubled
    by stability training; the model is built once whatever the method, sigma or batch."""
    import certlib.training.config as config_module

    config_module.forward_flops.cache_clear()
    built = []
    monkeypatch.setattr(config_module, "build_model", lambda *a: built.append(a[0]) or build_model(*a))
    wrn = TrainConfig("cifar10", "dssn", 0.25, batch_size=256)
    assert config_module.step_flops(wrn) == pytest.approx(5.032e11, rel=1e-3)
    stability = dataclasses.replace(wrn, method="gaussian", sigma=0.5, training="stability", batch_size=64)
    assert config_module.step_flops(stability) == config_module.step_flops(wrn) / 2
    assert built == ["wrn40_2"]
    assert config_module.step_flops(TrainConfig("digits", "dssn", 0.5)) < 1e9 and built == ["wrn40_2", "small_cnn"]


def test_dssn_digits_model_certifies_above_80_percent(trained_digits_dssn, digits):
    """Acceptance: a small CNN trained with DSSN noise at sigma 0.5 on digits (CPU, well under a
    minute) reaches a DSSN-certified clean accuracy (radius 0) above 80% on the test split."""
    _, test_set = digits
    path, _ = trained_digits_dssn
    model, card = load_checkpoint(path, method="dssn", sigma=0.5, seed=0, q=16, dataset="digits")
    noise = DSSNNoise(card.sigma, q=card.q, seed=card.seed)
    result = Smooth(model, noise, card.num_classes).certify(test_set.pixels())
    prediction, radius = dssn_radius(result["votes"], noise.levels, noise.q)
    certified = (prediction == test_set.labels.numpy()) & (radius >= 0)
    assert certified.mean() > 0.80


def test_the_cuda_graph_step_trains_the_eager_steps_model(cuda, train_model, digits, tmp_path):
    config = TrainConfig(
        "digits", "gaussian", 0.5, seed=3, epochs=2, training="stability", deterministic=True, heldout_limit=8
    )
    graphed = train_model(
        dataclasses.replace(config, cuda_graph=True), tmp_path / "g.pt", *digits, device=cuda, log=quiet
    )
    eager = train_model(
        dataclasses.replace(config, cuda_graph=False), tmp_path / "e.pt", *digits, device=cuda, log=quiet
    )
    assert graphed.hyperparameters["cuda_graph"] is True and eager.hyperparameters["cuda_graph"] is False
    (a, _), (b, _) = load_checkpoint(tmp_path / "g.pt"), load_checkpoint(tmp_path / "e.pt")
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_an_epoch_never_waits_for_the_gpu(cuda, train_model, digits, tmp_path, monkeypatch, cuda_graph):
    real_run_epoch = train_module._run_epoch

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
        try:
            return real_run_epoch(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train_module, "_run_epoch", strict)
    config = TrainConfig("digits", "dssn", 0.5, epochs=1, cuda_graph=cuda_graph, heldout_limit=8)
    train_model(config, tmp_path / "m.pt", *digits, device=cuda, log=quiet)


@pytest.mark.parametrize("method", ["dssn", "uniform", "gaussian", "zhang-l1", "zhang-l2", "zhang-linf"])
def test_a_cuda_graph_replays_only_noise_drawn_on_the_device(method):
    """Zhang et al.'s families draw their radii on the host, which a graph would replay as one draw
    every step: ``auto`` trains them eagerly and ``true`` is refused before training starts."""
    noise = make_noise(method, 0.5, q=16) if method == "dssn" else make_noise(method, 0.5)
    on_device = method not in ("zhang-l1", "zhang-l2", "zhang-linf")
    assert train_module.runs_as_graph("auto", "cuda", True, noise) is on_device
    assert train_module.runs_as_graph(False, "cuda", True, noise) is False
    assert train_module.runs_as_graph("auto", "cpu", True, noise) is False
    assert train_module.runs_as_graph("auto", "cuda", False, noise) is False
    if on_device:
        assert train_module.runs_as_graph(True, "cuda", True, noise) is True
    else:
        with pytest.raises(ValueError, match=f"cannot train with {method} noise, drawn on the host"):
            train_module.runs_as_graph(True, "cuda", True, noise)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train_module.runs_as_graph(True, "cpu", True, noise)


def test_deterministic_kernels_load_no_compiler_until_something_compiles(fresh_python):
    """torch.use_deterministic_algorithms imports torch._dynamo and inductor to set inductor's
    flag too (1.4 to 2 s of CPU where nothing else imports them): enabling deterministic
    kernels, and a ``deterministic_kernels`` block, set torch's flag alone; the engine sets
    inductor's where it compiles (``before_compiling``, tested in test_voting.py)."""
    code = (
        "import sys, inspect, torch\n"
        "from certlib.determinism import deterministic_kernels, enable_deterministic_kernels\n"
        "enable_deterministic_kernels()\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "with deterministic_kernels(False):\n"
        "    assert not torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert 'torch._inductor.config' not in sys.modules and 'torch._dynamo' not in sys.modules\n"
        "import certlib.engine.cascade as cascade\n"
        "assert 'before_compiling()' in inspect.getsource(cascade.Cascade._compiled_logits)\n"
        "print('ok')"
    )
    done = fresh_python.run(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_importing_certlib_fixes_the_cublas_workspace_before_any_cuda_work(fresh_python):
    """torch reads CUBLAS_WORKSPACE_CONFIG at a process's first cuBLAS call, so deterministic
    training after a model was timed (as `certify plan` does) needs it set at import; a value
    torch's deterministic cuBLAS does not accept is refused in one line."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    check = "import os, certlib; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    done = fresh_python.run(check, env=env)
    assert done.returncode == 0 and done.stdout.strip() == ":4096:8", done.stderr
    refuse = (
        "from certlib.determinism import enable_deterministic_kernels\n"
        "try:\n    enable_deterministic_kernels()\nexcept ValueError as err:\n    print(err)"
    )
    env["CUBLAS_WORKSPACE_CONFIG"] = ":1:1"
    done = fresh_python.run(refuse, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("deterministic kernels need CUBLAS_WORKSPACE_CONFIG=:4096:8")
