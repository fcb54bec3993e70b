"""`data.prompt_template`: a prompt built from several columns of a record (Alpaca's instruction + input).

The template is Python format text naming columns, e.g. "### Instruction:\n{instruction}\n\n### Input:\n{input}
\n\n### Response:\n". It is made of sections separated by a blank line ("\n\n"); a section that names a column
whose value is empty or missing in a record vanishes from that record's prompt (with its blank line), so
records without an input get no dangling "### Input:" heading. Sections that name no column always stay.
The two characters `\n` are read as a newline, so a template can be written on a command line (Hydra keeps
them as typed); `{{` and `}}` are literal braces.

A column the template names that no record has at all is a mistake (a typo, the wrong data set), not an empty
value: it stops the run with one line naming the column, the file and the columns there are.
"""

from __future__ import annotations

import string

from automodel.data.checks import text_of
from automodel.data.pairs import is_null
from automodel.errors import UserError

SEPARATOR = "\n\n"


def _empty(value) -> bool:
    return is_null(value) or (isinstance(value, (str, list, dict)) and not (value.strip() if isinstance(value, str)
                                                                           else value))


class PromptTemplate:
    def __init__(self, text: str):
        self.text = text.replace("\\n", "\n")
        self.sections = self.text.split(SEPARATOR)
        self.names = [self._fields(s) for s in self.sections]
        self.columns = list(dict.fromkeys(n for names in self.names for n in names))
        if not self.columns:
            raise UserError(f"data.prompt_template={text!r} names no column; write columns as {{name}}, "
                            f"e.g. \"{{instruction}}\\n\\n{{input}}\"")

    @staticmethod
    def _fields(section: str) -> list[str]:
        try:
            parsed = list(string.Formatter().parse(section))
        except ValueError as e:
            raise UserError(f"data.prompt_template: {e} in {section!r} (write a literal brace as {{{{ or }}}})") from None
        names = []
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if not name or name.isdigit() or any(ch in name for ch in ".["):
                raise UserError(f"data.prompt_template: {{{name}}} in {section!r} is not a column name; name a "
                                f"column in every {{...}}, e.g. {{instruction}}")
            names.append(name)
        return names

    def check(self, records) -> None:
        """One line when the template names a column that no record has."""
        present = list(dict.fromkeys(k for r in records.rows for k in r))
        for c in self.columns:
            if c not in present:
                raise UserError(f"{records.source}: data.prompt_template names column '{c}', which no record has; "
                                f"the columns are: {', '.join(present)}")

    def render(self, row: dict, where: str) -> str | None:
        """The prompt for one record (`where` names it in a message about a value that is not text); None when
        every section naming a column vanished (nothing to ask)."""
        kept, asked = [], False
        for section, names in zip(self.sections, self.names):
            if any(_empty(row.get(n)) for n in names):
                continue
            asked = asked or bool(names)
            kept.append(section.format(**{n: text_of(row[n], where, n) for n in names}))
        return SEPARATOR.join(kept) if asked else None
