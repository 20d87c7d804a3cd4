"""What an export shows: the check's table (printed by `kdcache export`, and in the model card) and the model card,
README.md of the export folder."""

from kdcache.outputs import human_bytes

COLUMNS = ("model", "file", "size", "max |Δlogit|", "agree student", "agree teacher", "accuracy")


def _figure(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table_rows(record: dict) -> list[list[str]]:
    """The check's table: the PyTorch student, the fp32 ONNX model, the int8 one; '-' where a figure does not apply."""
    check, models = record["check"], record["models"]
    rows = [["PyTorch fp32", "(the student)", "-", "-", "-", *_shared(check["pytorch"])]]
    for key, name in (("fp32", "ONNX fp32"), ("int8", f"ONNX {models.get('int8', {}).get('precision')}")):
        if key not in models:
            continue
        figures = check[key]
        rows.append(
            [
                name,
                models[key]["file"],
                human_bytes(models[key]["bytes"]),
                _figure(figures["max_abs_logit_difference"], ".2e"),
                _figure(figures["top1_agreement_with_student"]),
                *_shared(figures),
            ]
        )
    return rows


def _shared(figures: dict) -> list[str]:
    return [_figure(figures.get("top1_agreement_with_teacher")), _figure(figures.get("accuracy"))]


def where_checked(record: dict) -> str:
    rows = record["check"]["rows"]
    if "cache" not in rows:
        return f"{rows['random_images']} images of random pixels ({rows['why']})"
    return f"{rows['rows']} of the {rows['of_rows']} rows of split '{rows['split']}' of cache '{rows['cache']}'"


def describe(record: dict) -> str:
    """The lines `kdcache export` prints: where it wrote, what it checked on, the table."""
    table = [list(COLUMNS), *table_rows(record)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [
        f"exported {record['student']} to {record['output']}/ (int8: {record['int8']}, {record['int8_chosen_by']})"
    ]
    lines.append(f"  checked on {where_checked(record)}")
    lines += [
        "  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.append(
        "  fp32 check passed: the ONNX model gives the student's logits within the tolerance on every row "
        "(export.json says which)"
    )
    return "\n".join(lines)


def model_card(record: dict) -> str:
    """README.md of the export folder: what was exported, how it was quantized, and the check's figures."""
    table = table_rows(record)
    markdown = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    markdown += ["| " + " | ".join(row) + " |" for row in table]
    models = record["models"]
    height, width = record["input"]["shape"][2:]
    quantized = "Not quantized (`--int8 none`): model.onnx alone."
    if "int8" in models:
        scheme = models["int8"]["scheme"]
        quantized = (
            f"`{models['int8']['file']}` is {models['int8']['precision']} ({record['int8_chosen_by']}): "
            + "; ".join(f"{key} {value}" for key, value in scheme.items())
            + "."
        )
        calibration = record["calibration"]
        if calibration:
            quantized += (
                f" Calibrated on {calibration['rows']} images of split '{calibration['split']}' of cache "
                f"`{calibration['cache']}` ({calibration['views']} stored view(s) per image, replayed as "
                f"train-student served them; seed {calibration['seed']})."
            )
    if record["quantization_aware"]:
        quantized += f" The student was trained quantization-aware: {record['quantization_aware']}."
    return f"""---
library_name: onnx
pipeline_tag: image-classification
tags:
- kdcache
- onnx
- knowledge-distillation
---

# {record["student"].rstrip("/").split("/")[-1]}, exported to ONNX

The student `{record["student"]}` ({record["student_class"]}, {record["student_parameters"]:,} parameters), exported
by `kdcache export` (kdcache {record["kdcache_version"]}) with `torch.onnx.export(dynamo=True)` (torch
{record["exporter"]["torch"]}, onnxscript {record["exporter"]["onnxscript"]}) for ONNX Runtime
{record["exporter"]["onnxruntime"]}. Input `pixel_values`, float32 (batch, 3, {height}, {width}), as the image
processor in this folder (`preprocessor_config.json`) makes it; output `logits` over {len(record["label_names"])}
classes ({", ".join(record["label_names"][:10])}{", ..." if len(record["label_names"]) > 10 else ""}).

## Quantization

{quantized}

## Check

On {where_checked(record)}:

{chr(10).join(markdown)}

agree student: top-1 agreement with the PyTorch student; agree teacher: with the cached teacher's logits. The fp32
model passed: {record["check"]["tolerance"]}.

## Use

```python
import numpy as np
import onnxruntime
from transformers import AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("EXPORT_FOLDER")
session = onnxruntime.InferenceSession("EXPORT_FOLDER/{record["model"]}")
pixel_values = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
logits = session.run(None, {{"pixel_values": pixel_values}})[0]
```
"""
