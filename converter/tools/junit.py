"""JUnit XML of a batch run, the format CI systems render (GitHub, GitLab, Jenkins, Azure).

One <testsuite> with one <testcase> per job: name = the output folder, classname = the source,
time = seconds. A failed job gets <failure message="the one-line error" type="exit N">; a job
interrupted by Ctrl-C/SIGTERM gets <error type="interrupted">; a job not started (--fail-fast, or
the batch interrupted) gets <skipped>; every case's <system-out> says what happened and the output
size (and the quality totals when measured). Attributes follow the Ant/Jenkins JUnit schema
(tests, failures, errors, skipped, time on the suite). Every text and attribute is made XML 1.0:
characters it forbids (control characters, lone surrogates from undecodable file names, U+FFFE/FFFF),
which an error message or a source may hold, are written as ``\\xNN`` / ``\\uNNNN`` escapes.
"""

from __future__ import annotations

import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from converter.units import human_bytes

#: What XML 1.0 forbids (its Char production: tab, newline and carriage return are its only controls).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: object) -> str:
    """``value`` as text XML 1.0 allows: each forbidden character as its Python escape (``\\x1b``)."""
    return _NOT_XML.sub(lambda m: ascii(m.group())[1:-1], str(value))


def junit_xml(result: Any, *, suite: str = "quantize-model batch") -> bytes:
    """``result`` is converter.tools.batch_run.BatchResult."""
    root = _junit_tree(result, suite)
    for element in root.iter():  # every text and attribute, whatever wrote it
        element.attrib = {k: xml_text(v) for k, v in element.attrib.items()}
        if element.text is not None:
            element.text = xml_text(element.text)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _junit_tree(result: Any, suite: str) -> ET.Element:
    items = result.items
    root = ET.Element("testsuites")
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(items)),
        failures=str(sum(1 for i in items if i.status == "failed")),
        errors=str(sum(1 for i in items if i.status == "interrupted")),
        skipped=str(sum(1 for i in items if i.status == "cancelled")),
        time=f"{sum(i.seconds for i in items):.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
        hostname=socket.gethostname(),
    )
    for k in ("tests", "failures", "errors", "skipped", "time"):
        root.set(k, ts.get(k, "0"))
    for i in items:
        case = ET.SubElement(
            ts, "testcase", name=i.item.output, classname=i.item.source, time=f"{i.seconds:.3f}"
        )
        if i.status == "failed":
            failure = ET.SubElement(case, "failure", message=i.error or "failed", type=f"exit {i.exit_code}")
            failure.text = i.error or "failed"
        elif i.status == "interrupted":
            error = ET.SubElement(case, "error", message=i.error or "interrupted", type="interrupted")
            error.text = i.error or "interrupted"
        elif i.status == "cancelled":
            ET.SubElement(case, "skipped", message=i.error or "cancelled")
        out = ET.SubElement(case, "system-out")
        out.text = _summary(i)
    return root


def _summary(i: Any) -> str:
    parts = [f"{i.item.source} -> {i.item.output}: {i.status} in {i.seconds:.1f} s"]
    if i.ok:
        parts.append(f"output size {human_bytes(i.bytes_out)} ({i.bytes_out} bytes)")
    q = i.quality or {}
    if q.get("rel_rmse") is not None:
        parts.append(f"relative RMSE {q['rel_rmse']:.4f}, SNR {q.get('snr_db') or 0:.2f} dB")
    return "; ".join(parts)


def write_junit(result: Any, path: Path) -> None:
    from converter.writer.manifest import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, junit_xml(result))
