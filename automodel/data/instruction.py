"""Data plugins `instruction` and `hellaswag`: prompt/completion pairs, loss on the completion only.

`instruction` reads a completion column and either a prompt column (data.prompt_column) or a prompt built
from several columns by data.prompt_template (the `alpaca` option: instruction / input / output; see
automodel/data/template.py). `hellaswag` builds the pair from that public set's record format, as NeMo
AutoModel's recipe does; `squad` lives in squad.py (and is importable from here too). The sequence is
[bos] prompt completion [eos] (pairs.py).

A null completion or prompt (JSON null, an empty cell) would otherwise be trained on as the text "None":
such records are left out and counted in the log; when every record is, the run stops saying so. A list or
an object where text belongs stops the run naming the record (checks.text_of); a number becomes its text.
The prompt and the completion must be different columns: one column as both teaches the model to repeat
its prompt, with a loss that looks excellent.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.data.checks import kind_of, text_of
from automodel.data.examples import ExamplesConfig
from automodel.data.pairs import PairData, is_null
from automodel.data.squad import SquadConfig, SquadData  # noqa: F401  (its home before squad.py)
from automodel.data.template import PromptTemplate
from automodel.errors import UserError


@dataclasses.dataclass
class InstructionConfig(ExamplesConfig):
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    # null: the prompt is data.prompt_column; else a template naming columns, e.g. "{instruction}\n\n{input}"
    # (a blank-line-separated section naming an empty column vanishes); prompt_column is then unused
    prompt_template: Optional[str] = None
    add_eos: bool = True
    packing: bool = False  # several examples per row, no attention across them (position_ids restart)


class InstructionData(PairData):
    Config = InstructionConfig
    hint = "map yours with data.prompt_column / data.completion_column"

    def __init__(self, config: InstructionConfig):
        super().__init__(config)
        self.template = PromptTemplate(config.prompt_template) if config.prompt_template else None
        answer = config.completion_column
        if self.template is None and config.prompt_column == answer:
            raise UserError(f"data.prompt_column and data.completion_column are both '{answer}': the model would "
                            "learn to repeat its prompt; name the prompt's column and the answer's column")
        if self.template is not None and answer in self.template.columns:
            raise UserError(f"data.prompt_template names '{answer}', which is data.completion_column: the answer "
                            "would be in its own prompt; take it out of the template or name the answer's column")

    def columns(self):
        if self.template is not None:  # template columns may be absent from some records: checked in items()
            return (self.cfg.completion_column,)
        return self.cfg.prompt_column, self.cfg.completion_column

    def items(self, records, stats):
        if self.template is not None:
            self.template.check(records)
        out = []
        for i, r in enumerate(records.rows):
            completion = r[self.cfg.completion_column]
            if is_null(completion):
                stats.skip("records with a null completion")
                continue
            completion = text_of(completion, records.where(i), self.cfg.completion_column)
            if self.template is not None:
                prompt = self.template.render(r, records.where(i))
                if prompt is None:
                    stats.skip("records whose data.prompt_template columns are all empty")
                    continue
            else:
                prompt = r[self.cfg.prompt_column]
                if is_null(prompt):
                    stats.skip("records with a null prompt")
                    continue
                prompt = text_of(prompt, records.where(i), self.cfg.prompt_column)
            out.append((i, prompt, completion))
        return out


@dataclasses.dataclass
class HellaSwagConfig(ExamplesConfig):
    path: str = "Rowan/hellaswag"
    val_split: Optional[str] = None  # the preset (conf/data) picks the hub's "validation" where data.path has splits
    add_eos: bool = True
    packing: bool = False


class HellaSwagData(PairData):
    """HellaSwag records {ctx, endings: [4 strings], label}: prompt the context, completion the right ending
    (NeMo AutoModel's `HellaSwag` dataset: context, then target = endings[label])."""

    Config = HellaSwagConfig

    def columns(self):
        return "ctx", "endings", "label"

    def items(self, records, stats):
        out = []
        for i, r in enumerate(records.rows):
            endings = r["endings"]
            if not isinstance(endings, list):
                raise UserError(f"{records.where(i)}: 'endings' is {kind_of(endings)}, not a list of the candidate "
                                "endings")
            label = str(r["label"]).strip()
            if not label.isdigit() or int(label) >= len(endings):
                stats.skip("records without a usable label (the test split has none)")
                continue
            where = records.where(i)
            out.append((i, text_of(r["ctx"], where, "ctx"), " " + text_of(endings[int(label)], where, "endings")))
        return out
