"""The docs show the tested code: a code block that shows example code *is* that code.

In ``README.md`` and ``docs/*.md`` a code block is preceded by an HTML comment saying where its
content comes from::

    <!-- include: examples/dags/example_ray_basics.py howto_ray_task -->
    ```python
    (the lines between "# [START howto_ray_task]" and "# [END howto_ray_task]", dedented)
    ```

    <!-- include-diff: examples/notebooks/higgs_xgboost.ipynb -> examples/dags/higgs_xgboost.py xgb_tasks -->
    ```diff
    (unified diff, one line of context, from the notebook's function cells to the region)
    ```

    <!-- illustrative: why no example holds it -->
    ```python
    (a sketch; the test only checks that it says so)
    ```

Every ``python`` block must be included or illustrative. Regions are marked in the examples (and
test DAGs) with ``# [START name]`` / ``# [END name]`` lines; marker lines of regions nested inside
another are left out of it. A ``.ipynb`` source without a region name is the notebook's code cells
that only define functions, joined as a module would be.

Rewrite every included block from its source instead of copying by hand::

    ./scripts/sync_docs                       # = python -m tests.test_docs --fix
    python -m tests.test_docs                 # check only (no pytest, no Airflow start-up)

Also checked, because docs drift in these ways too: the ``airflow_ray.*`` names the docs mention
exist and are not deprecated aliases; repository paths they mention exist; relative links (and
their ``#anchors``) resolve; the README's install section names the package's real extras.
This module needs only the standard library.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX_COMMAND = "./scripts/sync_docs (python -m tests.test_docs --fix)"

DIRECTIVE = re.compile(r"^\s*<!--\s*(include-diff|include|illustrative)\b\s*:?\s*(.*?)\s*-->\s*$")
ANY_DIRECTIVE = re.compile(r"^\s*<!--\s*(include|illustrative)")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[^`\s]*)[^`]*$")
MARKER = re.compile(r"^\s*# \[(START|END) ([\w.-]+)\]\s*$")
#: Old names the docs must not use any more (the layout move: errors -> exceptions).
RETIRED = re.compile(r"\bRayTaskError\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- sources


def region(path: Path, name: str) -> str:
    """The lines between ``# [START name]`` and ``# [END name]`` in ``path``, dedented."""
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"# [START {name}]"]
    ends = [i for i, line in enumerate(lines) if line.strip() == f"# [END {name}]"]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise LookupError(
            f"{rel(path)}: region {name!r} needs one '# [START {name}]' before one '# [END {name}]' "
            f"(found {len(starts)} START, {len(ends)} END)"
        )
    body = [line for line in lines[starts[0] + 1 : ends[0]] if not MARKER.match(line)]
    return tidy(textwrap.dedent("\n".join(body)))


def notebook_functions(path: Path) -> str:
    """The notebook's code cells that only define functions, two blank lines apart."""
    defs = []
    for cell in json.loads(path.read_text())["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        body = ast.parse(src).body if cell["cell_type"] == "code" else []
        if body and all(isinstance(node, ast.FunctionDef) for node in body):
            defs.append(src.strip("\n"))
    return "\n\n\n".join(defs)


def source(spec: str) -> tuple[Path, str]:
    """``"path region"`` (or a notebook ``"path.ipynb"``) -> (path, text)."""
    parts = spec.split()
    if not parts or len(parts) > 2:
        raise LookupError(f"bad source {spec!r}: expected 'path region'")
    path = ROOT / parts[0]
    if not path.is_file():
        raise LookupError(f"no such file: {parts[0]}")
    if len(parts) == 1:
        if path.suffix != ".ipynb":
            raise LookupError(f"{parts[0]}: name the region (# [START name] ... # [END name])")
        return path, notebook_functions(path)
    return path, region(path, parts[1])


def expected_content(kind: str, args: str) -> str:
    if kind == "include":
        return source(args)[1]
    old_spec, sep, new_spec = args.partition("->")
    if not sep:
        raise LookupError(f"include-diff needs 'old source -> new source', got {args!r}")
    (old_path, old), (new_path, new) = source(old_spec), source(new_spec)
    base = Path(os.path.commonpath([old_path, new_path]))
    lines = difflib.unified_diff(
        old.splitlines(),
        new.splitlines(),
        str(old_path.relative_to(base)),
        str(new_path.relative_to(base)),
        n=1,
        lineterm="",
    )
    return tidy("\n".join(lines))


def tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


# --------------------------------------------------------------------------- docs


@dataclass
class Block:
    doc: Path
    fence_line: int  # 0-based index of the opening fence
    end_line: int  # 0-based index of the closing fence
    indent: str
    lang: str
    content: str
    kind: str | None  # include, include-diff, illustrative or None
    args: str

    @property
    def where(self) -> str:
        return f"{rel(self.doc)}:{self.fence_line + 1}"


def parse(doc: Path, text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown text, and problems with directives that precede none."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if ANY_DIRECTIVE.match(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f"{rel(doc)}:{i + 1}: a directive must be directly followed by a code block")
            elif ANY_DIRECTIVE.match(lines[i]) and not DIRECTIVE.match(lines[i]):
                problems.append(f"{rel(doc)}:{i + 1}: unknown directive {lines[i].strip()!r}")
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        directive = DIRECTIVE.match(lines[i - 1]) if i else None
        blocks.append(
            Block(
                doc=doc,
                fence_line=i,
                end_line=end,
                indent=indent,
                lang=opening["lang"],
                content=tidy("\n".join(body)),
                kind=directive[1] if directive else None,
                args=directive[2] if directive else "",
            )
        )
        i = end + 1
    return blocks, problems


def check_text(doc: Path, text: str, fix: bool = False) -> tuple[str, list[str]]:
    """Problems of one doc; with ``fix``, also the text with every included block rewritten."""
    blocks, problems = parse(doc, text)
    lines = text.splitlines()
    for block in reversed(blocks):  # from the end: rewriting keeps earlier line numbers valid
        if block.kind in (None, "illustrative"):
            if block.lang == "python" and block.kind is None:
                problems.append(
                    f"{block.where}: a python block must be included from an example "
                    "(<!-- include: path region -->) or marked <!-- illustrative: why -->"
                )
            continue
        try:
            want = expected_content(block.kind, block.args)
        except (LookupError, SyntaxError, ValueError) as exc:
            problems.append(f"{block.where}: {exc}")
            continue
        if block.content == want:
            continue
        if fix:
            lines[block.fence_line + 1 : block.end_line] = [
                block.indent + line if line else "" for line in want.splitlines()
            ]
        else:
            diff = "\n".join(
                difflib.unified_diff(
                    block.content.splitlines(), want.splitlines(), "docs", block.args, n=1, lineterm=""
                )
            )
            problems.append(f"{block.where}: differs from {block.args}; run {FIX_COMMAND}\n{diff}")
    new_text = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    return new_text, sorted(problems, key=_line_order)


def _line_order(problem: str) -> tuple[str, int]:
    where = problem.split(": ", 1)[0]
    name, _, line = where.partition(":")
    return name, int(line) if line.isdigit() else 0


def all_blocks() -> list[Block]:
    return [block for doc in doc_files() for block in parse(doc, doc.read_text())[0]]


# --------------------------------------------------------------------------- names, paths, links

MODULE_NAME = re.compile(r"(?<![\w.])airflow_ray(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:airflow_ray|examples|tests|benchmarks|scripts|docs)/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _top_level_names(module: Path) -> set[str]:
    """Names a module defines or re-exports (imports under TYPE_CHECKING, lazy ``_LAZY`` keys)."""
    tree = ast.parse(module.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node in tree.body:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) and isinstance(
                node.value, ast.Dict
            ):
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return names


def module_problem(dotted: str) -> str | None:
    """Why ``airflow_ray.a.b.Name`` does not name a current module (or a name in one), or None."""
    parts = dotted.split(".")
    directory: Path | None = ROOT
    module: Path | None = None
    index = 0
    while index < len(parts) and directory is not None:
        part = parts[index]
        if (directory / part / "__init__.py").is_file():
            directory, module = directory / part, directory / part / "__init__.py"
        elif (directory / f"{part}.py").is_file():
            directory, module = None, directory / f"{part}.py"
        else:
            break
        index += 1
    attribute = parts[index] if index < len(parts) else None
    if module is None:
        return f"{dotted}: no such module"
    docstring = ast.get_docstring(ast.parse(module.read_text())) or ""
    if docstring.lower().startswith("deprecated"):
        return f"{dotted}: {rel(module)} is deprecated ({docstring.splitlines()[0]})"
    if attribute is not None and attribute not in _top_level_names(module):
        return f"{dotted}: {attribute!r} is neither a module nor a name in {rel(module)}"
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def reference_problems(doc: Path) -> list[str]:
    text = doc.read_text()
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{rel(doc)}:{number}"
        for dotted in MODULE_NAME.findall(line):
            if problem := module_problem(dotted):
                problems.append(f"{where}: {problem}")
        for path in REPO_PATH.findall(line):
            if not (ROOT / path).exists():
                problems.append(f"{where}: no such path {path}")
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (doc.parent / file).resolve() if file else doc
            if not linked.exists():
                problems.append(f"{where}: broken link {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{where}: no heading #{anchor} in {rel(linked)}")
        if RETIRED.search(line):
            problems.append(f"{where}: {RETIRED.search(line)[0]} was renamed (see airflow_ray.exceptions)")
    return problems


# --------------------------------------------------------------------------- tests


def test_included_blocks_match_their_sources():
    problems = [p for doc in doc_files() for p in check_text(doc, doc.read_text())[1]]
    assert not problems, "\n\n".join(problems)


def test_something_is_included():
    """Guard against a check that passes vacuously: the docs include example code."""
    included = [b for b in all_blocks() if b.kind == "include"]
    assert len(included) >= 5
    assert all(b.content for b in included)


def test_every_python_block_is_included_or_illustrative():
    python = [b for b in all_blocks() if b.lang == "python"]
    assert python
    assert all(b.kind in ("include", "illustrative") for b in python), [
        b.where for b in python if b.kind not in ("include", "illustrative")
    ]


def test_the_check_sees_a_change_and_fix_restores_it():
    doc = ROOT / "README.md"
    text = doc.read_text()
    block = next(b for b in parse(doc, text)[0] if b.kind == "include")
    lines = text.splitlines()
    lines[block.fence_line + 2] += "  # drifted"
    broken = "\n".join(lines) + "\n"
    _, problems = check_text(doc, broken)
    assert len(problems) == 1 and "drifted" in problems[0], problems
    fixed, _ = check_text(doc, broken, fix=True)
    assert fixed == text
    assert check_text(doc, fixed)[1] == []


def test_regions_are_well_formed():
    """Every START has its END in the examples and test DAGs, once per name and file."""
    problems = []
    for path in sorted([*(ROOT / "examples").rglob("*.py"), *(ROOT / "tests" / "dags").rglob("*.py")]):
        names = {m[2] for line in path.read_text().splitlines() if (m := MARKER.match(line))}
        for name in sorted(names):
            try:
                region(path, name)
            except LookupError as exc:
                problems.append(str(exc))
    assert not problems, problems


def test_names_paths_and_links_in_the_docs_exist():
    problems = [p for doc in doc_files() for p in reference_problems(doc)]
    assert not problems, "\n".join(problems)


def test_the_name_check_sees_old_module_paths():
    assert module_problem("airflow_ray.xcom.RayXComBackend") is None
    assert module_problem("airflow_ray.hooks.job.RayJobHook") is None
    assert module_problem("airflow_ray.operators.RaySubmitJobOperator") is None
    assert module_problem("airflow_ray.errors.RayTaskError")  # deprecated alias (or gone)
    assert "'jobs' is neither" in module_problem("airflow_ray.jobs")
    assert "'RayTaskError' is neither" in module_problem("airflow_ray.exceptions.RayTaskError")
    assert "no such module" in module_problem("airflow_ray_x.y")


def test_readme_install_section_names_the_real_extras():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(pyproject["optional-dependencies"])
    readme = (ROOT / "README.md").read_text()
    install = readme.split("\n## Install", 1)[1].split("\n## ", 1)[0]
    for extra in extras:
        assert f"`{extra}`" in install, f"README's install section does not describe the extra {extra!r}"
    bash = [b.content for b in parse(ROOT / "README.md", install)[0] if b.lang == "bash"]
    used = {
        name
        for content in bash
        for spec in re.findall(r"(?<=[\w.)*])\[([a-z][\w,-]*)\]", content)
        for name in spec.split(",")
    }
    assert used and used <= extras, used - extras
    for requirement in pyproject["dependencies"]:
        if requirement.startswith(("apache-airflow>", "ray[")):
            assert requirement in install, f"README's install section should say {requirement}"
    # Not on PyPI yet: from a checkout or a wheel, never `pip install airflow-ray` from the index.
    assert not re.search(r"""(pip|uv pip) install ["']?airflow-ray\b""", install)
    # The first screen: exactly two commands.
    first_screen = readme.split("\n---\n", 1)[0]
    commands = [b.content for b in parse(ROOT / "README.md", first_screen)[0]]
    assert commands == ["./scripts/demo", "./scripts/test"], commands


# --------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    fix = "--fix" in argv
    problems = []
    for doc in doc_files():
        text = doc.read_text()
        new_text, doc_problems = check_text(doc, text, fix=fix)
        if fix and new_text != text:
            doc.write_text(new_text)
            print(f"rewrote {rel(doc)}")
            doc_problems = check_text(doc, new_text)[1]
        problems += doc_problems + reference_problems(doc)
    print("\n\n".join(problems) if problems else "docs: every included block matches its source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
