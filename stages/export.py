"""Stage `export`: the base model's export for params `encode` (e.g. ONNX int8), made once per base model and
encoding and cached by DVC, so every experiment on the same base reuses it (index_baseline, evaluate)."""

import click

from retrieval.io import atomic_dir, write_json

from .common import BASELINE_EXPORTS, load_params, params_option, section
from .encoding import encoding_for


@click.command("export")
@params_option
def command(params_path: str) -> None:
    """Export params `models.<model>.base_model` for the encoding backend into data/exports/baseline."""
    params = load_params(params_path)
    family_name = str(section(params, "model"))
    encoding = encoding_for(params, family_name)
    with atomic_dir(BASELINE_EXPORTS) as tmp:
        if not encoding.exported:
            # The declared output exists but holds no export: this family (or this setting) encodes with torch.
            note = {"family": family_name, "backend": "torch", "note": "nothing to export: encoding runs on torch"}
            write_json(note, tmp / "exports.json")
            click.echo(f"export: {note['note']}")
            return
        from retrieval.backends import export_folder
        from retrieval.hub import resolve_model

        base_model = str(section(params, "models", family_name, "base_model"))
        folder = export_folder(resolve_model(base_model), backend=encoding.backend, quantize=encoding.quantize,
                               cache_dir=tmp)
        write_json({"family": family_name, "base_model": base_model, "backend": encoding.backend,
                    "quantize": encoding.quantize, "folder": folder.name}, tmp / "exports.json")
    click.echo(f"export: {base_model} -> {BASELINE_EXPORTS / folder.name}")
