"""One step of noise-augmented training, run eagerly or replayed as a CUDA graph.

The step (Cohen et al. 2019 App. F; stability training: Li et al. 2019, Voracek & Hein 2023
Sec. 3.1): random crop and flip of the batch's integer grid values, the smoothing noise
(pixel scale [0, 1]), cross-entropy (plus C * KL between two noisy copies for stability
training), backward, one SGD step. The epoch's summed loss and correct count stay on the
device; the host reads them once per epoch, so nothing inside an epoch waits for the GPU.

On a GPU a step of a small network is launch-bound: hundreds of small kernels. ``GraphedStep``
captures the whole step, the gather of the batch from the device-resident split included, as
one CUDA graph, re-captured each epoch (the epoch's learning rate is a constant of the
graph). All randomness comes from the run's generator, registered with the graph, so replays
draw the same stream as eager steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certlib.families import SmoothingNoise
from certlib.training.batches import ResidentBatches

WARMUP_STEPS = 3  # eager steps before the first capture: cuDNN, cuBLAS and autograd set up lazily


def stability_loss(
    logits_1: torch.Tensor, logits_2: torch.Tensor, targets: torch.Tensor, weight: float
) -> torch.Tensor:
    """Stability training loss (Li et al. 2019; Voracek & Hein Sec. 3.1), batch mean:
    -log f(x + d1)_y + weight * KL(f(x + d1) || f(x + d2)), f the softmax of the logits."""
    log_p1, log_p2 = F.log_softmax(logits_1, dim=1), F.log_softmax(logits_2, dim=1)
    kl = (log_p1.exp() * (log_p1 - log_p2)).sum(dim=1)
    return F.nll_loss(log_p1, targets) + weight * kl.mean()


def augment(x: torch.Tensor, generator: torch.Generator | None, padding: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, per image, of integer grid
    values or pixels; values stay on the dataset's grid (padding is 0, a grid value)."""
    b, c, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[
            torch.arange(b, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        mirrored = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


class TrainStep:
    """The training step of one model, with the epoch's metrics summed on the device.

    ``training`` is "standard" or "stability"; ``amp`` runs the forward pass in bfloat16 on
    CUDA; ``channels_last`` feeds the network NHWC inputs (its weights must be NHWC too)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.SGD,
        noise: SmoothingNoise,
        q: int,
        generator: torch.Generator,
        *,
        training: str,
        stability_weight: float,
        crop_padding: int,
        flip: bool,
        amp: bool,
        channels_last: bool,
    ):
        self.model, self.optimizer, self.noise, self.q, self.generator = model, optimizer, noise, q, generator
        self.stability = training == "stability"
        self.stability_weight, self.crop_padding, self.flip = stability_weight, crop_padding, flip
        self.channels_last = channels_last
        self.device = next(model.parameters()).device
        self.amp = amp and self.device.type == "cuda"
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._init_momentum()

    def _init_momentum(self) -> None:
        # SGD creates its momentum buffers in the first step (buf = grad), which a graph
        # replay would redo every step; a zero buffer gives the same first step
        # (0 * momentum + grad) and fixed addresses.
        for group in self.optimizer.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    self.optimizer.state[p].setdefault(
                        "momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )

    def prime(self, input_shape: tuple[int, ...]) -> None:
        """One draw of the noise before the first epoch: a noise that builds a device table on
        first use (DSSN's offset vector, copied from the host) does it here, not mid-epoch.
        Every epoch re-seeds the generator, so this draw changes nothing."""
        self.noise.sample_grid(
            torch.zeros((1, *input_shape), dtype=torch.uint8, device=self.device), self.q, self.generator
        )

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.noise.sample_grid(x, self.q, self.generator)
        return noisy.contiguous(memory_format=torch.channels_last) if self.channels_last else noisy

    def __call__(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """One SGD step on a batch of uint8 grid values and their labels, on the device."""
        x = augment(values, self.generator, self.crop_padding, self.flip)
        # cache_enabled=False: autocast's weight cache would outlive a graph capture.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            logits = self.model(self._noisy(x))
            if self.stability:
                loss = stability_loss(logits, self.model(self._noisy(x)), labels, self.stability_weight)
            else:
                loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach().double() * labels.shape[0]
        self.correct += (logits.argmax(1) == labels).sum()

    def read_metrics(self) -> tuple[float, int]:
        """(summed loss, correct predictions) since the last read; waits for the device."""
        loss, correct = float(self.loss_sum), int(self.correct)
        self.loss_sum.zero_()
        self.correct.zero_()
        return loss, correct

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: parameters, buffers (BatchNorm statistics), momentum."""
        momentum = [s["momentum_buffer"] for s in self.optimizer.state.values() if "momentum_buffer" in s]
        return [*self.model.parameters(), *self.model.buffers(), *momentum, self.loss_sum, self.correct]


class GraphedStep:
    """``step`` on the next full batch of ``batches``, captured as one CUDA graph.

    Call ``capture()`` at the start of every epoch (after the learning rate changed, before
    the epoch's generator is seeded) and ``replay()`` once per full batch. Each capture has a
    memory pool of its own; the previous graph is released after the next one is captured."""

    def __init__(self, step: TrainStep, batches: ResidentBatches):
        self.step, self.batches = step, batches
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm_up()

    def _warm_up(self) -> None:
        """A few eager steps on a side stream (as capture requires), then every tensor they
        changed is put back: the warm-up leaves no trace in the trained model."""
        saved = [t.detach().clone() for t in self.step.state_tensors()]
        order = torch.arange(len(self.batches.order), device=self.batches.order.device)
        self.batches.start_epoch(order)
        side = torch.cuda.Stream(self.step.device)
        side.wait_stream(torch.cuda.current_stream(self.step.device))
        with torch.cuda.stream(side):
            for _ in range(min(WARMUP_STEPS, self.batches.full_batches)):
                self.step(*self.batches.next_batch())
        torch.cuda.current_stream(self.step.device).wait_stream(side)
        with torch.no_grad():
            for tensor, value in zip(self.step.state_tensors(), saved):
                tensor.copy_(value)

    def capture(self) -> None:
        """Capture the step for the current learning rate. Raises a RuntimeError naming the
        setting to change when the step cannot be captured (an operation that needs the host)."""
        graph = torch.cuda.CUDAGraph()
        # The capture stream and the generator's graph state are made on the current device: the
        # step's, not GPU 0, where it trains on another GPU of the host.
        with torch.cuda.device(self.step.device):
            graph.register_generator_state(self.step.generator)
        # Gradients are allocated by the captured backward, in the graph's pool, and reused by
        # every replay (CUDA graphs' whole-network capture).
        self.step.optimizer.zero_grad(set_to_none=True)
        try:
            # thread_local: a Ray actor reports progress from another thread during training.
            with torch.cuda.device(self.step.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.step(*self.batches.next_batch())
        except RuntimeError as err:
            raise RuntimeError(
                f"the training step cannot be captured as a CUDA graph ({str(err).splitlines()[0]}); "
                "train with cuda_graph: false"
            ) from err
        # The previous epoch's graph goes only now: its own memory pool is released with it.
        self.graph = graph

    def replay(self) -> None:
        if self.graph is None:
            raise RuntimeError("replay before capture: call capture() at the start of each epoch")
        self.graph.replay()
