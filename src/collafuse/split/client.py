"""The client role: keeps its images, trains the low-noise steps t = 1..cut, uploads one noised view per image,
and finishes sampling from the server's hand-off x_cut.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.images import as_model_range
from ..data.partition import ClientData
from . import fedavg
from .diffusion import DiffusionSchedule, to_index
from .learner import Learner
from .models import node_labels, node_model, node_model_config
from .protocol import SERVER, ContentLimits, Message, ProtocolError, check_content, client_node
from .sampling import client_segment, segment_steps
from .seeding import ClientSecret, SecretError
from .transport import Transport
from .upload import clip_images

logger = logging.getLogger("collafuse.client")


class Client:
    """Args:
        index (`int`): the client's index; its node id is ``client{index}``.
        data (`ClientData`): the client's private train/test images. They never leave this object.
        cfg (`Config`): the run configuration (cut, client model, training and sampling settings, seeds).
        device (`str`, *optional*): defaults to ``cfg.run.device``.
        secret (`ClientSecret`, *optional*): the root of this client's upload noise, model init, training and
            sampling noise. Defaults to a fresh one from OS entropy; a checkpoint's secret replaces it on
            ``load_state``. Give one only for a reproducible experiment, from a client-side file (never from the
            shared config, which the server holds too).
    """

    def __init__(self, index: int, data: ClientData, cfg: Config, device: str | None = None,
                 secret: ClientSecret | None = None):
        self.index = index
        self.node_id = client_node(index)
        # Its own steps per round, when [[clients]] (or a site's local config) sets them, whatever a request asks.
        self.own_steps = cfg.clients[index].client_steps if cfg.clients else None
        cfg = cfg.for_client(index)  # its own cut, model, batch size and steps ([[clients]]); the shared values else
        self.cfg = cfg
        self.cut = cfg.cut
        self.data = data
        self.device = torch.device(device or cfg.run.device)
        self.schedule = DiffusionSchedule(cfg.diffusion)
        # FedAvg: the client trains a copy of the global model (the server-model architecture, every step 1..T,
        # cfg.cut = T), so its label encoding is the server model's, its own index included where that embeds it.
        self.fedavg = cfg.split.algorithm == "fedavg"
        model_cfg = node_model_config(cfg, "client")
        self.labels = node_labels(cfg, "client")
        self._label_client = index if self.fedavg else 0
        # Every stream of this client comes from its secret (seeding.py): the server holds cfg and the node id,
        # so a stream derived from them alone would let it rebuild the upload noise and recover x0 exactly.
        # The public [seeds] still enter as names, so changing a seed in the config changes the stream.
        self._secret = secret if secret is not None else ClientSecret.new()
        self._secret_given = secret is not None
        seeds = cfg.seeds
        model = node_model(model_cfg, self.labels, self._secret.seed("init", seeds.init), self.node_id,
                           cfg.image_shape)
        self.learner = Learner(model, cfg.train, self._secret.generator("noise", seeds.noise),
                               self._secret.generator("sample", seeds.sample), str(self.device),
                               total_steps=cfg.train.rounds * cfg.train.client_steps, ema_per_step=not self.fedavg)
        self.pushed_round = 0  # FedAvg: the round of the last global weights applied (0: none yet)
        self._loss_w = self.schedule.loss_weights(range(1, self.cut + 1), cfg.train.min_snr_gamma) \
            if self.cut >= 1 else None
        self._upload: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (view number, u, y)
        # Kept as stored (uint8 for loaded data: 4x less memory than float32) and converted one batch at a time.
        self._train_images = data.train_images.to(self.device)
        self._train_y = data.train_y.to(self.device)
        # The last round trained and its loss: a repeated train_request (the server restarted, or re-sent after a
        # lost reply) is answered from here instead of training twice, so delivery may be at-least-once.
        self.rounds_done = 0
        self.last_loss = math.nan
        self.limits = ContentLimits.from_config(cfg)
        self._pending_y: torch.Tensor | None = None  # labels of the sample_request awaiting its hand-off
        self.finished: list[dict[str, torch.Tensor]] = []  # samples finished on server orders (Flower), not yet saved
        self.show_progress = False

    @property
    def trains(self) -> bool:
        """Whether the client owns any step (cut >= 1)."""
        return self.cut >= 1

    # -- training -----------------------------------------------------------------------------------------------------
    def upload(self, round_: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """u_i = sqrt(abar_s) x0_i + sqrt(1 - abar_s) eps_i for every training image, eps from the client's secret
        (x0_i first scaled to L2 norm <= C with ``split.upload_clip_norm``: collafuse.split.upload).

        Computed once and cached; recomputing from the same seed gives the same bytes, so a repeated upload
        (e.g. after a server restart) tells the server nothing new. Only with ``split.fresh_upload_noise`` does
        round r > 1 draw a new view (its own stream of the secret), and the server then collects one per round.
        """
        view = round_ if self.cfg.split.fresh_upload_noise else 1
        if self._upload is None or self._upload[0] != view:
            rng = self._secret.generator("upload", view)
            x0 = self.data.train_x  # converted for this once; only u is kept
            eps = torch.randn(x0.shape, generator=rng)
            if self.cfg.split.upload_clip_norm is not None:  # only the upload: the client's own model sees x0
                x0 = clip_images(x0, self.cfg.split.upload_clip_norm)
            u = self.schedule.noise(x0, eps, self.cut)
            self._upload = (view, u.contiguous(), self.data.train_y.clone())
        return self._upload[1], self._upload[2]

    def train_step(self) -> float:
        """One DDPM step on the client's own images at t ~ U{1..cut} (Ho et al. 2020, Algorithm 1)."""
        learner = self.learner
        idx = learner.randint(0, len(self._train_y), self.cfg.train.batch_size)
        x0, y = as_model_range(self._train_images[idx]), self._train_y[idx]
        t = learner.randint(1, self.cut + 1, len(idx))
        eps = learner.randn(x0.shape)
        x_t = self.schedule.noise(x0, eps, t)
        ids = self.labels.drop(self.labels.encode(y, self._label_client), self.cfg.train.cond_drop_prob, learner.rng)
        weights = None if self._loss_w is None else self._loss_w[t.cpu()]
        return learner.step(x_t, to_index(t), ids, eps, weights)

    def train(self, steps: int) -> float:
        """``steps`` local steps; returns their mean loss (NaN when the client owns no step)."""
        if not self.trains or steps == 0:
            return math.nan
        return sum(self.train_step() for _ in range(steps)) / steps

    def steps_for(self, requested: int) -> int:
        """The steps this client takes in a round: its own ``client_steps`` where it set them, else the request's."""
        return requested if self.own_steps is None else self.own_steps

    def check_steps(self, kind: str, steps: int) -> None:
        """Refuse a request for more local steps than this client's own ``train.client_steps`` (where it set its
        own steps the request's count is not used, so there is nothing to refuse)."""
        limit = self.cfg.train.client_steps
        if self.own_steps is None and steps > limit:
            raise ProtocolError(f"{kind} from server asks {self.node_id} for {steps} steps (allowed: at most {limit}, "
                                f"its train.client_steps)")

    def train_round(self, round_: int, steps: int) -> float:
        """Train for round ``round_`` once: a request for a round already done returns its loss again."""
        steps = self.steps_for(steps)
        if round_ > self.rounds_done:
            self.last_loss = self.train(steps)
            self.rounds_done = round_
        return self.last_loss

    # -- FedAvg -------------------------------------------------------------------------------------------------------
    def apply_global(self, round_: int, weights: torch.Tensor) -> None:
        """Load the global weights of ``round_`` into the model (once per round) and fold them into the EMA of the
        global weights (collafuse.split.fedavg). Adam's moments are this client's own and stay as they are."""
        if round_ <= self.pushed_round:
            return  # a repeated push: the weights were applied already
        try:
            fedavg.load_flat(self.learner.model, weights)
        except ValueError as e:
            raise ProtocolError(f"model_push to {self.node_id}: {e}") from None
        learner = self.learner
        k = max(self.cfg.train.client_steps, 1)  # one round of K steps, as the per-step EMA would have counted them
        decay = fedavg.round_decay(learner.ema.get_decay, learner.ema.optimization_step + 1, k)
        fedavg.ema_update(learner.ema.shadow_params, list(learner.model.parameters()), decay)
        learner.ema.optimization_step += k
        learner.forget_sampling_model()
        self.pushed_round = round_

    def fedavg_round(self, msg: Message) -> Message:
        """Answer a ``model_push``: apply the global weights, train K local steps on t = 1..T and return the new
        weights with this client's number of training images (FedAvg's weight). ``steps = 0`` only hands over the
        final average, answered by a ``train_reply``. A repeated push (at-least-once delivery) neither re-applies
        the weights nor trains again: it gets the same answer."""
        round_, steps = int(msg.meta["round"]), int(msg.meta["steps"])
        self.check_steps(msg.kind, steps)
        self.apply_global(round_, msg.arrays["weights"])
        if steps == 0:
            return Message("train_reply", self.node_id, SERVER, meta={"round": round_, "steps": 0})
        loss = self.train_round(round_, steps)
        meta = {"round": round_, "steps": self.steps_for(steps), "examples": len(self.data.train_y)}
        if not math.isnan(loss):
            meta["loss"] = loss
        return Message("model_update", self.node_id, SERVER, {"weights": fedavg.flatten(self.learner.model)}, meta)

    def handle(self, msg: Message) -> Message | None:
        """Answer the server's instructions. Only the upload (x_cut, y), an aggregate loss and the labels of a
        sampling request ever leave; the final samples stay here."""
        if msg.kind == "upload_request":
            u, y = self.upload(int(msg.meta["round"]))
            return Message("upload", self.node_id, SERVER, {"x_cut": u, "y": y},
                           {"round": msg.meta["round"], "cut": self.cut})
        if msg.kind == "train_request":
            self.check_steps(msg.kind, int(msg.meta["steps"]))
            loss = self.train_round(int(msg.meta["round"]), int(msg.meta["steps"]))
            meta = {"round": msg.meta["round"], "steps": self.steps_for(int(msg.meta["steps"]))}
            if not math.isnan(loss):
                meta["loss"] = loss
            return Message("train_reply", self.node_id, SERVER, meta=meta)
        if msg.kind == "sample_order":
            check_content(msg, self.limits)
            if self.cut == self.cfg.diffusion.timesteps:  # cut = T or FedAvg: this client owns the whole chain
                batch = self.sample(int(msg.meta["n"]), None)  # from its own x_T; nothing is asked of the server
                self.finished.append(batch)
                return Message("sample_done", self.node_id, SERVER, meta={"n": len(batch["y"])})
            self._pending_y = self.sample_labels(int(msg.meta["n"]))
            return Message("sample_request", self.node_id, SERVER, {"y": self._pending_y})
        if msg.kind == "sample_response":
            check_content(msg, self.limits)
            y = self._pending_y
            if y is None or len(y) != len(msg.arrays["x_cut"]):
                raise ProtocolError(f"sample_response with {len(msg.arrays['x_cut'])} hand-offs, but {self.node_id} "
                                    f"awaits {0 if y is None else len(y)}")
            self.check_handoff_cut(msg)
            x0 = self.finish(msg.arrays["x_cut"], y)
            self.finished.append({"x0": x0.cpu(), "x_cut": msg.arrays["x_cut"].cpu(), "y": y.cpu()})
            self._pending_y = None
            return Message("sample_done", self.node_id, SERVER, meta={"n": len(y)})
        if msg.kind == "model_push":
            return self.fedavg_round(msg)
        if msg.kind == "join_request":
            return Message("join", self.node_id, SERVER)
        if msg.kind == "error":
            logger.warning("server refused a message from %s: %s", self.node_id, msg.meta["reason"])
            return None
        raise ProtocolError(f"{self.node_id} cannot handle message kind {msg.kind!r}")

    # -- sampling -----------------------------------------------------------------------------------------------------
    def check_handoff_cut(self, msg: Message) -> None:
        """Refuse a hand-off that the server says is at another step than this client's cut: finishing it from
        here would be wrong at every step."""
        if int(msg.meta["cut"]) != self.cut:
            raise ProtocolError(f"sample_response from server hands {self.node_id} an x_cut at step "
                                f"{msg.meta['cut']} (allowed: {self.cut}, its own cut)")

    def sample_labels(self, n: int) -> torch.Tensor:
        """n class labels following the client's own class mix (largest remainder), sorted for tidy grids."""
        counts = torch.bincount(self.data.train_y, minlength=self.cfg.num_classes).double()
        quota = counts / counts.sum() * n
        alloc = quota.floor().long()
        for c in torch.argsort(quota - alloc, descending=True)[: n - int(alloc.sum())]:
            alloc[c] += 1
        return torch.repeat_interleave(torch.arange(self.cfg.num_classes), alloc)

    def finish(self, x_cut: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Client steps t = cut..1 from the hand-off x_cut to x0."""
        sp = self.cfg.sample
        model = self.learner.sampling_model(sp.use_ema)
        ids = self.labels.encode(y.to(self.device), self._label_client)
        bar = tqdm(total=segment_steps(self.schedule, sp, self.cut)[1], desc=f"{self.node_id} steps", leave=False,
                   disable=not self.show_progress)
        with bar:
            gen = generator or self.learner.sample_rng
            return client_segment(model, self.schedule, sp, self.cut, ids, self.labels.null_id, x_cut.to(self.device),
                                  gen, self.learner.precision, bar.update)

    def sample(self, n: int, transport: Transport | None, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> dict:
        """Generate n images: ask the server for x_cut (one request per batch), then finish locally.

        With cut = T the server owns no step, so the client starts from x_T ~ N(0, I) itself and sends nothing.
        ``labels`` (int64 [n], optional): the classes to draw, in order; default: the client's own class mix
        (`sample_labels`). Returns ``{"x0", "x_cut", "y"}`` on the CPU.
        """
        if labels is not None and len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries for n = {n} images (allowed: one label per image)")
        y_all = self.sample_labels(n) if labels is None else labels.long().cpu()
        sp = self.cfg.sample
        server_steps = self.schedule.split_sampler(sp.sampler, self.cut, sp.ddim_steps,
                                                   sp.server_grid_steps).server_steps
        gen = generator or self.learner.sample_rng
        out = {"x0": [], "x_cut": [], "y": []}
        for y in y_all.split(self.cfg.sample.batch_size):
            if server_steps:
                reply = transport.request(Message("sample_request", self.node_id, SERVER, {"y": y}))
                self.check_handoff_cut(reply)
                x_cut = reply.arrays["x_cut"]
            else:
                x_cut = torch.randn((len(y), *self.cfg.image_shape), generator=gen)
            x0 = self.finish(x_cut, y, gen)
            for k, v in (("x0", x0), ("x_cut", x_cut), ("y", y)):
                out[k].append(v.cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def stream(self, *names: object) -> torch.Generator:
        """A CPU generator from this client's secret, e.g. ``stream("eval", seed)`` for evaluation samples."""
        return self._secret.generator("stream", *names)

    # -- checkpoint state: the Learner (model, Adam, EMA, RNG streams), the round counter and the secret ----------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.learner.state()
        tensors["secret"] = self._secret.tensor()  # this client's own checkpoint file only, never the server's
        meta["rounds_done"] = self.rounds_done
        if self.fedavg:
            meta["pushed_round"] = self.pushed_round
        meta["last_loss"] = None if math.isnan(self.last_loss) else self.last_loss
        if self._pending_y is not None:
            tensors["pending_y"] = self._pending_y.contiguous()
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "secret" not in tensors:
            raise SecretError(f"{self.node_id}'s checkpoint holds no client secret: it was written before client "
                              f"secrets (its upload noise was derivable by the server); train the run again")
        saved = ClientSecret.from_tensor(tensors["secret"])
        if self._secret_given and saved != self._secret:
            raise SecretError(f"{self.node_id}: the given client secret is not the one this checkpoint was trained "
                              f"with (allowed: the same secret, or none to use the saved one)")
        self._secret = saved  # re-sent uploads stay bit-identical across restarts
        self._upload = None
        self.learner.load_state(tensors, meta)
        self.rounds_done = int(meta.get("rounds_done", 0))  # 0 for checkpoints from before the field
        self.pushed_round = int(meta.get("pushed_round", 0))
        self.last_loss = math.nan if meta.get("last_loss") is None else float(meta["last_loss"])
        self._pending_y = tensors.get("pending_y")
