"""The server role: trains the high-noise steps t = cut+1..T from the clients' uploads with the relative-noise
objective, and denoises from pure noise down to exactly x_cut for sampling requests.

It never receives x0, epsilon, client weights or gradients: everything it gets arrives through ``handle``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from . import fedavg
from .diffusion import DiffusionSchedule, to_index
from .learner import Learner
from .models import node_labels, node_model
from .protocol import SERVER, ContentLimits, Message, ProtocolError, check_content, client_index
from .sampling import segment_steps, server_segment
from .seeding import generator as make_generator
from .upload_pool import UploadPool, upload_digest

logger = logging.getLogger("collafuse.server")


class Server:
    """Args:
        cfg (`Config`): the run configuration (cut, server model, training and sampling settings, seeds).
        device (`str`, *optional*): defaults to ``cfg.run.device``.
        state_dir (`Path`, *optional*): the server's own state directory; with ``split.upload_pool = "disk"`` the
            uploads are stored under ``state_dir/uploads`` (collafuse.split.upload_pool) and reused after a restart.
            None keeps them in memory.
    """

    node_id = SERVER

    def __init__(self, cfg: Config, device: str | None = None, state_dir: Path | None = None):
        self.cfg = cfg
        # The reference cut s_ref (split.min_cut): the model predicts the relative noise of a view uploaded at s_ref.
        # Every client of a homogeneous federation is at it; a client at a later cut is rescaled to it
        # (docs/protocol.md, Heterogeneous cuts). The cuts it accepts: [min_cut, max_cut].
        self.cut = cfg.reference_cut
        self.cut_range = cfg.cut_range
        self.T = cfg.diffusion.timesteps
        self.device = torch.device(device or cfg.run.device)
        self.schedule = DiffusionSchedule(cfg.diffusion)
        self.labels = node_labels(cfg, "server")
        model = node_model(cfg.server_model, self.labels, cfg.seeds.init, SERVER, cfg.image_shape)
        self.learner = Learner(model, cfg.train, make_generator(cfg.seeds.noise, SERVER),
                               make_generator(cfg.seeds.sample, SERVER), str(self.device),
                               total_steps=cfg.train.rounds * cfg.train.server_steps)
        self._loss_w_by_cut: dict[int, torch.Tensor | None] = {}
        self._loss_w = self.loss_weights(self.cut) if self.cut < self.T else None
        # client index -> (x_cut, y): in memory, or memory-mapped shards in the state directory
        pool_dir = Path(state_dir) / "uploads" if state_dir is not None and cfg.split.upload_pool == "disk" else None
        self.uploads = UploadPool(pool_dir, self.device, cfg.identity_hash())
        # Each client's cut, as its first upload declared it: later uploads must keep it, and its hand-offs stop there.
        # Kept in the checkpoint, so a client cannot change its cut across a server restart either.
        self.client_cuts: dict[int, int] = {}
        # The labels each client uploaded: the only labels it may request hand-offs for (plus sample.shared_labels).
        # Kept in the checkpoint, so the rule survives a restart before the uploads are re-sent. None: a checkpoint
        # from before the rule, where the server cannot know them and does not enforce it.
        self.client_labels: dict[int, set[int]] | None = {}
        self.limits = ContentLimits.from_config(cfg)
        # Budgets per client (docs/protocol.md, "Bounds"): the training round in progress (Orchestrator.run_round
        # starts it), the hand-offs made for each client in it (split.sample_quota), and each client's accepted view
        # (its digest and the round it came in): one view per run, or one per round with split.fresh_upload_noise.
        # The views are kept in the checkpoint, so the rule survives a restart.
        self.round = 0
        self.sampled: dict[int, int] = {}
        self.views: dict[int, tuple[str, int]] = {}
        self.show_progress = False
        # FedAvg: the learner's model is the global model (seeds.init, public: every client starts from it) and it
        # is never trained here; the clients' weights of the current round wait in ``updates`` until ``aggregate``.
        self.fedavg = cfg.split.algorithm == "fedavg"
        self.updates: dict[int, tuple[torch.Tensor, int]] = {}  # client index -> (weights, training images)

    @property
    def trains(self) -> bool:
        """Whether the server owns any step (cut < T)."""
        return self.cut < self.T

    def loss_weights(self, cut: int) -> torch.Tensor | None:
        """The per-step weights of a view uploaded at ``cut``: those of a homogeneous server at that cut, normalised
        over its own steps cut+1..T (DiffusionSchedule.loss_weights); None when unweighted."""
        if cut not in self._loss_w_by_cut:
            tr = self.cfg.train
            self._loss_w_by_cut[cut] = self.schedule.loss_weights(range(cut + 1, self.T + 1), tr.min_snr_gamma,
                                                                  cut if tr.server_abs_eps_weight else None)
        return self._loss_w_by_cut[cut]

    def cut_of(self, client: int) -> int:
        """The cut client ``client`` declared with its upload (before any upload: the one its config gives)."""
        return self.client_cuts.get(client, self.cfg.client_cut(client) if client < self.cfg.data.num_clients
                                    else self.cut)

    def check_cut(self, client: int, cut: int) -> None:
        """Refuse an upload's cut outside [min_cut, max_cut], or one that differs from the client's earlier uploads."""
        lo, hi = self.cut_range
        if not lo <= cut <= hi or cut >= self.T:
            raise ProtocolError(f"upload from client{client} declares cut {cut} (allowed: [{lo}, {min(hi, self.T - 1)}]"
                                f", split.min_cut..split.max_cut)")
        if client in self.client_cuts and self.client_cuts[client] != cut:
            raise ProtocolError(f"upload from client{client} declares cut {cut}, but its earlier uploads were at cut "
                                f"{self.client_cuts[client]} (allowed: {self.client_cuts[client]}; a cut cannot change "
                                f"during a run)")

    def start_round(self, round_: int) -> None:
        """A training round begins: the per-round budgets start again."""
        self.round = round_
        self.sampled.clear()

    def check_view(self, client: int, digest: str) -> None:
        """Refuse a second, different view of a client's images: one per run (re-sent unchanged after a restart is
        fine), or one per round with ``split.fresh_upload_noise``. More views would average the noise away."""
        old = self.views.get(client)
        if old is None or old[0] == digest:
            return
        if not self.cfg.split.fresh_upload_noise:
            raise ProtocolError(f"upload from client{client} is a second, different view of its images (allowed: one "
                                f"view per run, re-sent unchanged; split.fresh_upload_noise = true for one per round)")
        if old[1] == self.round:
            raise ProtocolError(f"upload from client{client} is a second new view in round {self.round} (allowed: one "
                                f"per round with split.fresh_upload_noise)")

    # -- training -----------------------------------------------------------------------------------------------------
    def receive_upload(self, client: int, x_cut: torch.Tensor, y: torch.Tensor, cut: int | None = None) -> None:
        """Keep client ``client``'s upload, a view at ``cut`` (default: the reference cut)."""
        cut = self.cut if cut is None else cut
        self.check_cut(client, cut)
        digest = upload_digest(x_cut.detach().cpu().contiguous(), y.detach().cpu().contiguous())
        self.check_view(client, digest)
        self.client_cuts[client] = cut
        if self.views.get(client, ("",))[0] != digest:
            self.views[client] = (digest, self.round)
        if not self.uploads.put(client, x_cut, y, cut, digest):
            return  # the same view again (e.g. after a restart): nothing new
        if self.client_labels is not None:
            self.client_labels[client] = {int(c) for c in torch.unique(y)}

    def check_sample_labels(self, client: int, y: torch.Tensor) -> None:
        """Refuse labels that are private to other clients: a client may ask only for the classes it uploaded and
        for ``sample.shared_labels`` (with cut = 0 too: the labels still came with its upload)."""
        if self.client_labels is None:
            return
        allowed = self.client_labels.get(client, set()) | set(self.cfg.sample.shared_labels)
        asked = {int(c) for c in torch.unique(y)}
        if not asked <= allowed:
            raise ProtocolError(f"sample_request from client{client} asks for labels {sorted(asked - allowed)} that "
                                f"it never uploaded (allowed: {sorted(allowed)}; share more with sample.shared_labels)")

    def pool(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All uploads, mixed: (x_cut, y, client index, cut), in client order (read whole: for inspection; training
        reads its batches from ``uploads.batch``)."""
        return self.uploads.batch(torch.arange(self.uploads.total()))

    @property
    def mixed_cuts(self) -> bool:
        """Whether the uploads come from more than one cut (every step is then the mixed one)."""
        return any(cut != self.cut for cut in self.uploads.cuts.values())

    def train_step(self) -> float:
        """One step of the relative-noise objective (split-protocol.md, Training):

        x_t = sqrt(r_t) u + sqrt(1 - r_t) eps',  r_t = abar_t / abar_s,  loss = ||eps_S(x_t, t, y) - eps'||^2,

        with t ~ U{s+1..T}. When the views come from several cuts s_i, each image keeps its own s_i and its own t-range,
        and the model's output is read relative to the reference cut (`mixed_train_step`).
        """
        learner = self.learner
        idx = learner.randint(0, self.uploads.total(), self.cfg.train.batch_size)
        u, y, c, s = self.uploads.batch(idx)
        if self.mixed_cuts:
            return self.mixed_train_step(u, y, c, s)  # the cuts stay on the CPU, with its RNG
        t = learner.randint(self.cut + 1, self.T + 1, len(idx))  # protocol steps s+1..T
        eps_rel = learner.randn(u.shape)
        x_t = self.schedule.server_noise(u, eps_rel, t, self.cut)
        ids = self.labels.drop(self.labels.encode(y, c), self.cfg.train.cond_drop_prob, learner.rng)
        weights = None if self._loss_w is None else self._loss_w[t.cpu()]
        return learner.step(x_t, to_index(t), ids, eps_rel, weights)

    def mixed_train_step(self, u: torch.Tensor, y: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> float:
        """One step on a batch whose views come from different cuts s_i >= s_ref (docs/protocol.md, Heterogeneous
        cuts). Image i draws t ~ U{s_i+1..T}, its own steps, and x_t from its own view exactly as at one cut. The
        model f predicts eps'_ref, the relative noise at the reference cut: E[eps | x_t] = k_t(s_ref) f. Since also
        E[eps | x_t] = k_t(s_i) E[eps'_i | x_t], image i's prediction of its own eps'_i is rho_i f with
        rho_i = k_t(s_ref) / k_t(s_i) <= 1, and its loss is that of a homogeneous server at s_i:

            ||rho_i f - eps'_i||^2 w_t(s_i) = w_t(s_i) / a_i^2 * ||f - a_i eps'_i||^2,   a_i = 1 / rho_i,

        written in the second form (a target and a weight), so the learner's update is the same code."""
        learner = self.learner
        t = s + 1 + (torch.rand(len(s), generator=learner.rng, dtype=torch.float64) * (self.T - s)).long()
        t = torch.minimum(t, torch.full_like(t, self.T)).to(self.device)  # U{s+1..T} per image
        eps_rel = learner.randn(u.shape)
        s_dev = s.to(self.device)
        x_t = self.schedule.server_noise(u, eps_rel, t, s_dev)
        t_cpu = t.cpu()
        a = (self.schedule.server_eps_scale(t_cpu, s) / self.schedule.server_eps_scale(t_cpu, self.cut)).float()
        w = torch.ones(len(s))
        for cut in torch.unique(s).tolist():
            cut_w = self.loss_weights(int(cut))
            if cut_w is not None:
                sel = s == cut
                w[sel] = cut_w[t_cpu[sel]]
        ids = self.labels.drop(self.labels.encode(y, c), self.cfg.train.cond_drop_prob, learner.rng)
        target = eps_rel * a.to(self.device).view(-1, 1, 1, 1)
        return learner.step(x_t, to_index(t), ids, target, (w / a ** 2).to(self.device))

    def train(self, steps: int) -> float:
        """``steps`` server steps on the mixed uploads; returns their mean loss (NaN if the server owns no step)."""
        if not self.trains or steps == 0 or not self.uploads:
            return math.nan
        return sum(self.train_step() for _ in range(steps)) / steps

    # -- FedAvg -------------------------------------------------------------------------------------------------------
    def global_weights(self) -> torch.Tensor:
        """The global model's weights as the vector a ``model_push`` carries."""
        return fedavg.flatten(self.learner.model)

    def aggregate(self) -> int:
        """Replace the global weights by the average of this round's updates, weighted by each client's training
        images (collafuse.split.fedavg); returns how many clients it averaged (0: nobody replied, the weights stay)."""
        if not self.updates:
            return 0
        fedavg.load_flat(self.learner.model, fedavg.weighted_average([self.updates[k] for k in sorted(self.updates)]))
        n = len(self.updates)
        self.updates.clear()
        return n

    def receive_update(self, client: int, weights: torch.Tensor, examples: int) -> None:
        n = fedavg.num_weights(self.learner.model)
        if weights.numel() != n:
            raise ProtocolError(f"model_update from client{client} carries {weights.numel()} weights (allowed: "
                                f"exactly {n}, the global model's parameter count)")
        self.updates[client] = (weights.clone(), examples)

    # -- sampling -----------------------------------------------------------------------------------------------------
    def sample_to_cut(self, y: torch.Tensor, client: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), then server steps t = T..s_i+1 with eps_hat = k_t * eps_S(x_t, t, y); returns x_{s_i} for
        client i at its cut s_i. k_t is that of the reference cut, which the model's output is relative to, whatever
        the client's cut (docs/protocol.md, Heterogeneous cuts); the grid is anchored on the client's cut."""
        sp, cut = self.cfg.sample, self.cut_of(client)
        model = self.learner.sampling_model(sp.use_ema)
        ids = self.labels.encode(y.to(self.device), client)
        gen = generator or self.learner.sample_rng
        x = torch.randn((len(y), *self.cfg.image_shape), generator=gen).to(self.device)
        bar = tqdm(total=segment_steps(self.schedule, sp, cut)[0], desc="server steps", leave=False,
                   disable=not self.show_progress)
        with bar:
            return server_segment(model, self.schedule, sp, cut, self.cut, ids, self.labels.null_id, x, gen,
                                  self.learner.precision, bar.update)

    def handle(self, msg: Message) -> Message | None:
        """Act on a client's message. Everything is checked before anything changes, so a refused message
        (``ProtocolError``) leaves the server exactly as it was."""
        sender = client_index(msg.sender)
        if sender >= self.cfg.data.num_clients:
            raise ProtocolError(f"{msg.sender} is not a client of this run ({self.cfg.data.num_clients} clients)")
        check_content(msg, self.limits)
        if msg.kind == "upload":
            if not self.trains:
                raise ProtocolError(f"upload from {msg.sender}: the server owns no step at cut = T")
            self.receive_upload(sender, msg.arrays["x_cut"], msg.arrays["y"], int(msg.meta["cut"]))
            return None
        if msg.kind == "model_update":
            self.receive_update(sender, msg.arrays["weights"], int(msg.meta["examples"]))
            return None
        if msg.kind in ("train_reply", "sample_done"):
            return None
        if msg.kind == "error":
            logger.warning("%s reported an error: %s", msg.sender, msg.meta["reason"])
            return None
        if msg.kind == "sample_request":
            if not self.trains:
                raise ProtocolError(f"sample_request from {msg.sender}: the server owns no step at cut = T")
            self.check_sample_labels(sender, msg.arrays["y"])
            n, made, quota = len(msg.arrays["y"]), self.sampled.get(sender, 0), self.cfg.split.sample_quota
            if made + n > quota:
                raise ProtocolError(f"sample_request from {msg.sender} asks for {n} hand-offs after {made} in round "
                                    f"{self.round} (allowed: {quota} per client per round, split.sample_quota)")
            x_cut = self.sample_to_cut(msg.arrays["y"], sender)
            self.sampled[sender] = made + n
            # the step the hand-off is at: the client refuses one that is not at its own cut
            return Message("sample_response", SERVER, msg.sender, {"x_cut": x_cut}, {"cut": self.cut_of(sender)})
        raise ProtocolError(f"server cannot handle message kind {msg.kind!r}")

    # -- checkpoint state: everything the node must keep to resume exactly lives in its Learner ---------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.learner.state()
        if self.client_labels is not None:
            meta["client_labels"] = {str(k): sorted(v) for k, v in sorted(self.client_labels.items())}
        if any(cut != self.cut for cut in self.client_cuts.values()):  # only when mixed: others stay byte-equal
            meta["client_cuts"] = {str(k): v for k, v in sorted(self.client_cuts.items())}
        if self.views:
            meta["upload_views"] = {str(k): list(v) for k, v in sorted(self.views.items())}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.learner.load_state(tensors, meta)
        labels = meta.get("client_labels")
        self.client_labels = None if labels is None else {int(k): set(v) for k, v in labels.items()}
        # Without the key every client uploaded at the reference cut (a homogeneous run, or one from before the key).
        cuts = meta.get("client_cuts")
        self.client_cuts = {int(k): int(v) for k, v in cuts.items()} if cuts else \
            ({k: self.cut for k in self.client_labels} if self.client_labels else {})
        self.views = {int(k): (str(v[0]), int(v[1])) for k, v in meta.get("upload_views", {}).items()}
        # a stored pool that verifies is used again: its clients are not asked to upload (they would re-send the
        # same bytes). Its cuts must be the ones the checkpoint knows.
        for client in self.uploads.reopen(set(range(self.cfg.data.num_clients))):
            if self.client_cuts.get(client, self.uploads.cuts[client]) != self.uploads.cuts[client]:
                logger.warning("stored upload of client%d is at cut %d, the checkpoint says %d: asked again",
                               client, self.uploads.cuts[client], self.client_cuts[client])
                self.uploads.forget(client)
