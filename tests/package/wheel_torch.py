"""Run by tests/package/wheel.sh under the project environment's interpreter (which has torch)
with only the installed wheel's files on sys.path for moe: `import moe; import moe.torch` come
from the installed package, and the README's "From PyTorch" example runs as written."""
import pathlib
import re
import sys

import moe
import moe.torch

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(moe.__file__).resolve().is_relative_to(site), moe.__file__
assert pathlib.Path(moe.torch.__file__).resolve().is_relative_to(site), moe.torch.__file__
readme = pathlib.Path(sys.argv[2]).read_text()
code = re.search(r"```python\n(.*?)```", readme.split("### From PyTorch", 1)[1], re.S).group(1)
exec(compile(code, "README.md (From PyTorch)", "exec"), {})
print("wheel: import moe.torch and the README's PyTorch example ran from", site)
