"""The params ``encode`` section as the index, train, export and evaluate stages use it."""

import click

from retrieval.encoding import Encoding, encoding_from_params
from retrieval.models import EXPORTABLE_FAMILIES, FP32_ENCODING_FAMILIES

from .common import BASELINE_EXPORTS, section


def encoding_for(params: dict, family_name: str) -> Encoding:
    """params ``encode`` resolved for the family (the export stage's output searched for ready exports)."""
    try:
        return encoding_from_params(section(params, "encode"), exportable=family_name in EXPORTABLE_FAMILIES,
                                    export_dirs=(BASELINE_EXPORTS,),
                                    bf16_when_auto=family_name not in FP32_ENCODING_FAMILIES)
    except ValueError as error:
        raise click.ClickException(f"params.yaml {error}") from None
