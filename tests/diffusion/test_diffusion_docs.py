"""Execute the ```python blocks of docs/PYTHON_API.md in order, in one namespace."""

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "PYTHON_API.md"


def test_python_api_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    # Tiny tensors: intra-op threading only adds contention on the shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    # The snippets computed what they claim.
    assert namespace["terms"]["loss"].shape == (4,)
    assert namespace["ancestral"].shape == namespace["cfg"].shape == (4, 3, 8, 8)
    assert not torch.equal(namespace["guided"], namespace["ancestral"])
    assert namespace["bpd"]["vb"].shape == (4, 100)
    assert torch.isfinite(namespace["bpd"]["total_bpd"]).all()
