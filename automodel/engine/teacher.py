"""The distillation teacher on the run's mesh: built on the meta device, laid out by the run's parallel plugin
(after the student: per-step layout state, such as context parallel's split of the sequence, is shared), each
rank loading only its shards of the teacher's weights, frozen in eval mode.

The step asks it for logits of the very inputs the student saw (already padded, position-numbered and, under
CP, sequence-split for the layout), so both distributions cover the same tokens on every rank.

Under pipeline parallelism the teacher is cut into the same number of stages as the student (each split by its
own layer count) and has a schedule of its own, forward only. Before the student's schedule runs a step, the
teacher's runs the step's micro-batches up to its last stage, which keeps each micro-batch's input (hidden
states). The student's loss, on its last stage, then asks for one micro-batch's teacher logits at a time: the
teacher's last stage runs on that input right there. So the stages never exchange logits, and no more than one
micro-batch's teacher logits exist at once, as without a pipeline.
"""

from __future__ import annotations

import logging

import torch

from automodel.errors import UserError

log = logging.getLogger("automodel")


class Teacher:
    def __init__(self, plugin, model: torch.nn.Module, autocast, hidden_head=None):
        self.plugin = plugin
        self.model = model
        self.kd_ratio = float(plugin.kd_ratio)
        self._autocast = autocast
        self.hidden_head = hidden_head  # set when the student's loss forms the teacher's logits in its own head
        self.pipeline = None  # under pp: its forward-only schedule (defer_last_stage), set once the student's exists
        self._received: list[torch.Tensor] = []  # under pp: the last stage's inputs of this step's micro-batches

    @property
    def in_head(self) -> bool:
        return self.hidden_head is not None

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        """The teacher's logits of the inputs, or its last hidden states when `in_head`."""
        with self._autocast():
            return self.model(**inputs).logits

    def forward_stages(self, input_ids: torch.Tensor) -> None:
        """Under pp: this step's micro-batches through every stage but the last (collective over the pp group)."""
        if self._received:
            raise RuntimeError(f"the teacher's last stage was not run for {len(self._received)} micro-batch(es) of "
                               "the previous step: the student's schedule and the teacher's disagree")
        with self._autocast():
            self._received = self.pipeline.forward_to_last(input_ids)

    @torch.no_grad()
    def next_logits(self, like: torch.Tensor) -> torch.Tensor:
        """Under pp, on the last stage: the teacher's logits of the next micro-batch (the schedule's order), whose
        student logits are `like`."""
        if not self._received:
            raise RuntimeError("the student's schedule asked for more micro-batches than the teacher's ran")
        received = self._received.pop(0)
        if received.shape[:2] != like.shape[:2]:
            raise RuntimeError(f"the teacher's micro-batch {tuple(received.shape[:2])} is not the student's "
                               f"{tuple(like.shape[:2])}: the two schedules disagree")
        with self._autocast():
            return self.pipeline.run_last(received)

    def chunks(self, output: torch.Tensor):
        """What the student's head needs to distill from `output` (collective under a sharded layout)."""
        return self.hidden_head.chunks(output, self.plugin.model.name, self.kd_ratio,
                                       float(self.plugin.cfg.temperature))

    def token_loss(self, student_logits, teacher_logits, labels):
        return self.plugin.token_loss(student_logits, teacher_logits, labels)


def check(plugin, loss, parallel, dims, student_model, skeleton, student_name: str) -> None:
    """Refuse, before the student is laid out, what distillation cannot do here: a teacher the layout cannot
    serve, a loss that never forms the student's logits, a teacher whose logits cover another vocabulary."""
    try:
        parallel.check_model(dims, plugin.model.hf_config())
    except UserError as e:
        raise UserError(f"teacher {plugin.model.name!r}: {e}") from None
    if not getattr(loss, "returns_logits", True) and not getattr(loss, "distills_in_head", False):
        raise UserError(f"distillation needs the student's logits, which loss={getattr(loss, 'option', '?')} never forms; "
                        "use loss=ce or loss=chunked_ce with a teacher")
    student_vocab = _vocab(student_model)
    teacher_vocab = _vocab(skeleton)
    if student_vocab != teacher_vocab:
        raise UserError(f"teacher {plugin.model.name!r} has logits over {teacher_vocab} tokens but the student "
                        f"{student_name!r} over {student_vocab}: distillation needs one vocabulary (a teacher of the "
                        "student's tokenizer family)")


def _vocab(model) -> int:
    from automodel.modules import hf_base

    head = hf_base(model).get_output_embeddings()
    return head.out_features if head is not None else hf_base(model).config.vocab_size


def build(plugin, model, parallel, mesh, dims, mp_policy, device, seed: int, autocast,
          in_head: bool = False) -> Teacher:
    """The teacher (`model`: its meta-device skeleton) laid out on `mesh` by `parallel` (the student's plugin,
    applied a second time), with its pretrained weights in each rank's shards. `in_head`: its head hands back
    hidden states (the student's loss forms the teacher's logits chunk by chunk)."""
    from automodel import head_loss
    from automodel.engine.materialize import canonical_names, hf_init, materialize

    hidden_head = head_loss.install_hidden(model, plugin.model.name) if in_head else None
    base_keys = set(model.state_dict())
    source = plugin.model.weights(model) if hasattr(plugin.model, "weights") else None
    if source is None:
        raise UserError(f"teacher {plugin.model.name!r} has no pretrained weights (teacher.model.path is not set): a "
                        "randomly initialized teacher teaches nothing; give teacher.model.path=<folder or hub id>")
    model.requires_grad_(False)
    model.eval()
    names = canonical_names(model)
    model = parallel.apply(model, mesh, dims, mp_policy)
    try:
        materialize(model, names, device, seed=seed, inits=[hf_init(model)], source=source, base_keys=base_keys)
    finally:
        source.close()
    model.eval()
    log.info("teacher %s: %.2fM parameters, frozen; kd_ratio %.3g", plugin.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, plugin.kd_ratio)
    return Teacher(plugin, model, autocast, hidden_head)

