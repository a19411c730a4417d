"""Define the Contract type shared by every artifact's schema module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from refinery.core.errors import InputError

# column -> list of pandera Checks; a function so pandera is imported only when validating
ChecksFactory = Callable[[Any], Mapping[str, list]]


@dataclass(frozen=True)
class Contract:
    """An artifact's contract: Arrow schema (types, nullability) and row-level Pandera checks.

    Attributes:
        name: the artifact name, as in ``schemas/<name>.py``.
        arrow: the exact schema written to Parquet; non-nullable fields are required values.
        checks: builds ``{column: [pandera.Check, ...]}`` given the ``pandera.pandas`` module.
        unique: columns whose values must be unique within the artifact.
    """

    name: str
    arrow: pa.Schema
    checks: ChecksFactory = field(default=lambda pda: {})
    unique: tuple[str, ...] = ()

    def pandera_schema(self) -> Any:
        """Build the strict Pandera schema (columns, dtypes, nullability, checks, uniqueness)."""
        import pandas as pd
        import pandera.pandas as pda

        checks = self.checks(pda)
        unknown = set(checks) - set(self.arrow.names)
        if unknown:
            raise ValueError(f"contract {self.name}: checks for unknown columns {sorted(unknown)}")
        columns = {
            f.name: pda.Column(pd.ArrowDtype(f.type), nullable=f.nullable, checks=checks.get(f.name, []),
                               unique=f.name in self.unique)
            for f in self.arrow
        }
        return pda.DataFrameSchema(columns, strict=True, ordered=True, name=self.name)

    def empty(self) -> pa.Table:
        """Return a zero-row table with this schema."""
        return self.arrow.empty_table()

    def validate(self, table: pa.Table, where: str) -> pa.Table:
        """Check ``table`` against the contract and return it cast to the Arrow schema.

        Args:
            table: the artifact's rows.
            where: the file (or artifact name) that error messages name.

        Raises:
            InputError: one line naming the first failing row and field.
        """
        missing = [n for n in self.arrow.names if n not in table.column_names]
        if missing:
            raise InputError(where, f"missing column(s) {', '.join(missing)} ({self.name} contract)",
                             field=missing[0])
        extra = [n for n in table.column_names if n not in self.arrow.names]
        if extra:
            raise InputError(where, f"unexpected column(s) {', '.join(extra)} ({self.name} contract)",
                             field=extra[0])
        for f in self.arrow:
            column = table.column(f.name)
            if not f.nullable and column.null_count:
                first = column.is_null().to_pylist().index(True)
                raise InputError(where, f"missing value (null) in a required column ({self.name} contract)",
                                 row=first + 1, field=f.name)
        try:
            table = table.select(self.arrow.names).cast(self.arrow)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as e:
            raise InputError(where, f"does not match the {self.name} contract ({e})") from None
        if table.num_rows == 0:
            return table
        import pandas as pd
        import pandera.pandas as pda

        df = table.to_pandas(types_mapper=pd.ArrowDtype)
        try:
            self.pandera_schema().validate(df, lazy=True)
        except pda.errors.SchemaErrors as e:
            cases = e.failure_cases
            first = cases.iloc[0]
            index = first.get("index")
            row = int(index) + 1 if index is not None and not pd.isna(index) else None
            value = first.get("failure_case")
            shown = repr(value) if not isinstance(value, str) or len(value) < 80 else repr(value[:77] + "...")
            more = f" ({len(cases) - 1} more failure(s))" if len(cases) > 1 else ""
            raise InputError(where, f"{first['check']} failed for value {shown} ({self.name} contract){more}",
                             row=row, field=first.get("column")) from None
        return table
