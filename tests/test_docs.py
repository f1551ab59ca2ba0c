"""The documentation agrees with the code: README.md, docs/, .env.example, the Dockerfile, deploy/kubernetes.yaml.

Fast and offline. Each check reads what the code actually does (the settings it reads, the TwiML it
prints, the answers it gives, the records it writes) and fails when the docs drift from it.
"""

from __future__ import annotations

import os
import json
import logging
import re
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bridge.agents import AgentCatalog
from bridge.call import Call, RecordEvent
from bridge.config import AgentConfig
from bridge.settings import (
    APPLICATION_VARIABLES,
    DEPRECATED_LINE_VARIABLES,
    ConfigError,
    Settings,
    documented_default,
    env_example,
    environment_fields,
    load_settings,
    setting_names,
)
from bridge.functions import FunctionRunner, check_function_map
from bridge.records import CallRecord, RecordWriter
from conftest import ROOT, empty_env

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV_EXAMPLE = (ROOT / ".env.example").read_text(encoding="utf-8")
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
DOCKERIGNORE = (ROOT / ".dockerignore").read_text(encoding="utf-8")
KUBERNETES = (ROOT / "deploy" / "kubernetes.yaml").read_text(encoding="utf-8")
SAMPLE_PUBLIC_URL = "https://abc123.ngrok-free.app"


# ----------------------------------------------------------------------------------- helpers

def read_doc(name: str) -> str:
    """A documentation file by its path from the repository root, e.g. ``docs/functions.md``."""
    return (ROOT / name).read_text(encoding="utf-8")


def section(title: str, level: int = 2, in_file: str = "README.md") -> str:
    """The text of ``in_file`` under the heading ``title``, up to the next heading of the same level."""
    marker = "#" * level + " "
    lines = read_doc(in_file).splitlines()
    try:
        start = lines.index(marker + title)
    except ValueError:
        raise AssertionError(f"{in_file} has no heading {marker + title!r}") from None
    body = []
    for line in lines[start + 1:]:
        if re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "\n".join(body)


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` (also those indented inside list items), dedented."""
    blocks = re.findall(rf"^([ \t]*)```{language}\n(.*?)^\1```", text, flags=re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def table_first_cells(text: str) -> list[str]:
    """The first cell of every body row (not header) of the Markdown tables in ``text``."""
    cells, in_body = [], False
    for line in text.splitlines():
        if re.fullmatch(r"\|[-:| ]+\|", line.strip()):
            in_body = True
        elif in_body and line.startswith("|"):
            cells.append(line.split("|")[1].strip())
        else:
            in_body = False
    return cells


def setting_variables() -> set[str]:
    """The variables the settings table (bridge/settings.py) says the bridge reads."""
    return set(setting_names())


class RecordingEnviron(dict[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def documented_names() -> set[str]:
    return setting_variables() | {name for name, _, _ in APPLICATION_VARIABLES}


def env_example_entries() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE, flags=re.M))


CONFIGURATION = "docs/configuration.md"  # the settings table, the flags, config.json
FUNCTIONS = "docs/functions.md"
CALL_RECORDS = "docs/call-records.md"
DEPLOYMENT = "docs/deployment.md"
PERFORMANCE = "docs/performance.md"


def readme_settings_table() -> dict[str, tuple[str, str]]:
    """``NAME -> (default cell, meaning cell)`` from the settings table (docs/configuration.md)."""
    rows = re.findall(
        r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \| (.*) \|$", section("Settings (`.env`)", in_file=CONFIGURATION), flags=re.M
    )
    return {name: (default.strip(), meaning.strip()) for name, default, meaning in rows}


# -------------------------------------------------------------------------------- settings

def test_load_settings_reads_exactly_the_variables_of_the_table() -> None:
    """The table is the whole truth: no variable is read that it doesn't list (old names aside)."""
    environ = RecordingEnviron({"DEEPGRAM_API_KEY": "k"})
    load_settings(environ)
    old = {old_name for _, setting in environment_fields() for old_name in setting.old_names}
    assert environ.read == setting_variables() | old | set(DEPRECATED_LINE_VARIABLES)


def test_every_setting_has_a_doc_line_a_section_and_a_unit_in_its_name() -> None:
    for item, setting in environment_fields():
        assert setting.doc.endswith(".") and "\n" not in setting.doc and len(setting.doc) < 200, setting.name
        assert item.name == setting.name.lower(), f"{setting.name}: one naming style, field = variable in lower case"
        if setting.unit in ("seconds", "bytes", "days"):
            assert setting.name.endswith("_" + setting.unit.upper()), f"{setting.name}: the unit goes last in the name"


def test_pharmacy_functions_reads_pharmacy_db() -> None:
    source = (ROOT / "pharmacy_functions.py").read_text(encoding="utf-8")
    assert 'environ.get("PHARMACY_DB"' in source


def test_env_example_is_the_table() -> None:
    assert ENV_EXAMPLE == env_example(), "regenerate it: python -m bridge.settings > .env.example"


def test_env_example_changes_no_default() -> None:
    """Copying .env.example to .env must give the documented defaults, not stale copies of them."""
    entries = {**env_example_entries(), "DEEPGRAM_API_KEY": "a-real-key"}  # the placeholder is refused
    from_example = load_settings(entries)
    defaults = load_settings({"DEEPGRAM_API_KEY": entries["DEEPGRAM_API_KEY"]})
    for field in from_example.__dataclass_fields__:
        if field != "phone_page_token":  # random at each start
            assert getattr(from_example, field) == getattr(defaults, field), f"{field} in .env.example is not the default"


def test_readme_settings_table_is_exactly_the_variables_with_their_defaults() -> None:
    """docs/configuration.md's table: every variable once, its default as the table has it, its doc line first."""
    table = readme_settings_table()
    assert set(table) == documented_names(), "the settings table must list exactly the variables the code reads"
    for item, setting in environment_fields():
        default_cell, meaning = table[setting.name]
        assert default_cell == documented_default(item, setting), setting.name
        assert meaning.startswith(setting.doc.rstrip(".")), f"{setting.name}: its meaning starts with the table's doc line"
    for name, default, doc in APPLICATION_VARIABLES:
        assert table[name] == (f"`{default}`", table[name][1]) and table[name][1].startswith(doc.rstrip(".")), name


def test_every_command_line_flag_is_documented() -> None:
    source = (ROOT / "main.py").read_text(encoding="utf-8")
    flags = [flag for flag, rest in re.findall(r'add_argument\("(--[a-z-]+)"(.*)', source) if "SUPPRESS" not in rest]
    assert {"--host", "--port", "--config", "--env-file", "--workers"} <= set(flags)
    documented = table_first_cells(section("Command-line flags", in_file=CONFIGURATION))
    for flag in flags:
        assert any(cell.startswith(f"`{flag}") for cell in documented), f"{CONFIGURATION} does not document {flag}"


def test_the_startup_error_samples_are_what_main_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/configuration.md's sample errors, in order, each from main.py on such a config.json."""
    import main

    (documented,) = code_blocks(section("What startup checks", in_file=CONFIGURATION), "")
    base = json.loads((ROOT / "config.json").read_text(encoding="utf-8"))
    old_key = json.loads(json.dumps(base))
    old_key["agent"]["speaking"] = old_key["agent"].pop("speak")  # the pre-v1 name
    undeclared = json.loads(json.dumps(base))
    undeclared["agent"]["think"]["functions"].append(
        {"name": "refill", "description": "d", "parameters": {"type": "object", "properties": {}}}
    )
    configs: list[str | int] = [
        json.dumps(old_key),
        '{"type": "Settings",\n  "audio": {}\n"agent": {}}',  # a comma left out
        150_000_000,  # bytes, as a sparse file
        json.dumps(undeclared),
    ]
    monkeypatch.chdir(tmp_path)  # so --config config.json is named as the docs name it
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    monkeypatch.setenv("RECORD_CALLS", "false")
    printed = []
    for config in configs:
        path = tmp_path / "config.json"
        if isinstance(config, int):
            with path.open("wb") as file:
                file.truncate(config)
        else:
            path.write_text(config, encoding="utf-8")
        assert main.main(["--config", "config.json", "--env-file", str(empty_env(tmp_path))]) == 2
        printed.append(capsys.readouterr().err)
    assert "".join(printed) == documented


def test_the_optional_parameter_sample_is_what_startup_says() -> None:
    _, declaration = readme_example_function()
    sample = re.search(r"`(config\.json declares the optional parameter [^`]*)`", read_doc(FUNCTIONS))
    assert sample, f"{FUNCTIONS} shows no sample of the optional-parameter error"
    with pytest.raises(ConfigError) as caught:
        check_function_map({"get_opening_hours": lambda: {}}, {"get_opening_hours": declaration})
    assert str(caught.value) == sample.group(1)


# ------------------------------------------------------------------------- quick start, TwiML

def test_quick_start_commands() -> None:
    quick = section("Quick start")
    for command in ("cp .env.example .env", "pip install -r requirements.txt && python main.py"):
        assert command in quick, f"Quick start lacks {command!r}"
    assert "your-deepgram-api-key" in quick and "DEEPGRAM_API_KEY=your-deepgram-api-key" in ENV_EXAMPLE
    assert "pip install -r requirements-dev.txt && pytest" in section("Running the tests")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    assert "pytest" in lines, ".ci/run must run the README's test command"
    assert "export CI=1" in lines[: lines.index("pytest")], ".ci/run must run pytest with CI set (missing tools fail)"


def test_the_fake_agent_section_starts_the_bridge_against_the_fake_agent() -> None:
    """README's "Try it without a Deepgram key": its .env lines are what startup accepts, its URL
    is where the fake agent listens by default, and its keypad menu is the fake agent's."""
    from bridge import fake_agent

    text = section("Try it without a Deepgram key", level=3)
    assert "`python -m bridge.fake_agent`" in text
    [block] = code_blocks(text, "")
    env = dict(line.split("=", 1) for line in block.strip().splitlines())
    assert env["DEEPGRAM_AGENT_URL"] == f"ws://{fake_agent.DEFAULT_HOST}:{fake_agent.DEFAULT_PORT}"
    settings = load_settings({**env, "PHONE_PAGE": "true", "HOST": "127.0.0.1"})
    assert settings.deepgram_agent_url == env["DEEPGRAM_AGENT_URL"] and settings.browser_only
    words = " ".join(text.split())
    for keys, name, _ in fake_agent.MENU:
        assert " or ".join(f"**{'#' if key == 'pound' else key}**" for key in keys) + f" `{name}`" in words, name


def test_readme_twiml_is_what_main_prints() -> None:
    twiml = load_settings({"DEEPGRAM_API_KEY": "k", "PUBLIC_URL": SAMPLE_PUBLIC_URL}).twiml
    assert twiml in code_blocks(section("Connect a Twilio number"), "xml")[0]


def test_the_quick_start_shows_the_twiml_main_prints_without_public_url() -> None:
    twiml = load_settings({"DEEPGRAM_API_KEY": "k"}).twiml
    assert twiml in code_blocks(section("Quick start"), "text")[0]


def test_the_readme_shows_the_default_host_and_asks_nobody_to_set_it() -> None:
    """HOST defaults to 127.0.0.1: the Quick start's banner shows it, and trying the browser
    phone does not ask for it as if it had to be set."""
    default = load_settings({"DEEPGRAM_API_KEY": "k"}).host
    assert default == "127.0.0.1"
    assert f"INFO    bridge serving on http://{default}:5000: " in code_blocks(section("Quick start"), "text")[0]
    assert f"HOST={default}" not in section("Try it without a phone")


def test_every_twiml_in_the_docs_streams_both_ways_and_ends_with_connect() -> None:
    documents = [
        document
        for path in DOC_FILES
        for document in re.findall(r"<Response>.*?</Response>", path.read_text(encoding="utf-8"))
        if "<Stream" in document  # not the fallback's <Dial>
    ]
    assert len(documents) >= 3
    # The TwiML Bin that passes the caller's number on (Twilio fills {{From}} in a Bin).
    assert any('<Parameter name="From" value="{{From}}"/>' in document for document in documents)
    for document in documents:
        response = ET.fromstring(document)
        for parameter in response.iter("Parameter"):
            assert parameter.get("name") and parameter.get("value"), document
        assert [child.tag for child in response][-1] == "Connect", f"<Connect> must be the last verb: {document}"
        stream = response.find("Connect/Stream")
        assert stream is not None, document
        url = stream.get("url", "")
        assert url.startswith("wss://") and url.endswith("/twilio") and "?" not in url, document


def without_code(text: str) -> str:
    """Markdown with its fenced code blocks removed: a ``#`` line in a shell block is no heading."""
    return re.sub(r"^([ \t]*)```.*?^\1```", "", text, flags=re.S | re.M)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings (a repeated heading gets -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", without_code(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def relative_links(text: str) -> list[str]:
    """The targets of the Markdown links in ``text`` that stay in the repository."""
    targets = re.findall(r"\]\(([^)\s]+)\)", without_code(text))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_the_link_checker_finds_broken_links() -> None:
    text = "# A b\n\n[ok](#a-b) [bad](#nope) [web](https://example.com)\n```sh\n# not a heading\n```\n"
    assert heading_anchors(text) == {"a-b"}
    assert relative_links(text) == ["#a-b", "#nope"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for target in relative_links(text):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        assert destination.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"
        assert destination.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and destination.suffix == ".md":
            anchors = heading_anchors(destination.read_text(encoding="utf-8"))
            assert anchor in anchors, f"{path.relative_to(ROOT)} links to {target}, which is no heading there"


# ------------------------------------------------------------ what the docs name, exists

def repository_files() -> list[str]:
    """The repository's files (tracked, or new and not ignored), as paths from its root."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return [path for path in listed.stdout.splitlines() if (ROOT / path).exists()]  # not those deleted meanwhile


def inline_code(text: str) -> list[str]:
    """The text of every `inline code` span of Markdown outside its fenced code blocks."""
    return re.findall(r"`([^`\n]+)`", without_code(text))


def readme_citations(text: str) -> list[str]:
    """The README sections ``text`` cites by name in prose: README's "X", README's *X*, the README, *X*."""
    return re.findall(r"""README(?:'s|,)\s+["*“]([^"*”\n]+)["*”]""", text)


def test_the_citation_finder_finds_each_way_of_citing() -> None:
    text = 'see the README\'s "Quick start", the README, *Secrets in config.json*, or README\'s *Production*.'
    assert readme_citations(text) == ["Quick start", "Secrets in config.json", "Production"]


def test_every_readme_section_cited_in_prose_exists() -> None:
    """A link to a README heading is checked by the link test; a section named in prose is checked here."""
    headings = set(re.findall(r"^#+ (.*)$", without_code(README), flags=re.M))
    sources = [*DOC_FILES, *sorted((ROOT / "bridge").rglob("*.py")), ROOT / "main.py"]
    for path in sources:
        for title in readme_citations(path.read_text(encoding="utf-8")):
            assert title in headings, f"{path.relative_to(ROOT)} cites the README's {title!r}, which is no heading there"


# Names in the docs that look like file paths but are none of the repository's, each with why.
NOT_OUR_FILES = {
    "_state.py": "h11's module, cited as the model of bridge/call/phase.py",
    "asyncapi.yml": "Deepgram's published API specification",
    "Calls.json": "Twilio's REST resource, not a file",
}
# Folders of the repository that hold the reader's own files: the docs name examples of them.
READERS_FOLDERS = {"agents": "the reader's own agent files (NAME.json, numbers.json); the repository ships only a README"}


def mentioned_paths(text: str) -> list[str]:
    """The words of the inline code spans of ``text`` shaped like a relative file path."""
    paths = []
    for span in inline_code(text):
        for word in span.split():
            word = word.strip(",;:()'\"").rstrip(".")
            if "://" in word or word.startswith(("/", "-", "$", "{", "~")):
                continue
            if re.fullmatch(r"(?:[\w.-]+/)+[\w.*<>-]*|[\w.-]+\.(?:py|md|json|jsonl|yaml|yml|txt|ini|html|toml)", word):
                paths.append(word)
    return paths


def test_the_path_finder_finds_paths_and_only_paths() -> None:
    text = "`bridge/settings.py`, `python -m bridge.fake_agent`, `main.py --port 5050`, `/twiml`, `https://x.io/a.py`, `data/`"
    assert mentioned_paths(text) == ["bridge/settings.py", "main.py", "data/"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_file_path_the_docs_name_exists(path: Path) -> None:
    """`bridge/settings.py`, `tests/fakes.py`, `deploy/kubernetes.yaml`, `phase.py`: each is in the
    repository. Paths under a folder the repository doesn't have (`data/`, `calls/`: made at run
    time) are the reader's, as are examples in a folder of the reader's own files."""
    files = repository_files()
    top = {file.split("/")[0] for file in files}
    names = {file.rsplit("/", 1)[-1] for file in files}
    missing = []
    for mentioned in mentioned_paths(path.read_text(encoding="utf-8")):
        first, slash, rest = mentioned.partition("/")
        if mentioned in NOT_OUR_FILES or (slash and (first not in top or first in READERS_FOLDERS and rest)):
            continue
        if "*" in mentioned or "<" in mentioned:
            continue  # a pattern (agents/*.json), not one file
        found = (ROOT / mentioned).exists() if slash else mentioned in names or (ROOT / mentioned).exists()
        if not found:
            missing.append(mentioned)
    assert missing == [], f"{path.relative_to(ROOT)} names files the repository does not have"


# Repository paths cited in code that are known not to exist, each fixed where the code is owned.
STALE_IN_CODE = {("bridge/call/consult.py", "bridge/warm_transfer.py")}


def test_every_repository_path_the_code_and_tests_cite_exists() -> None:
    """A docstring or comment naming tests/test_x.py or bridge/x.py sends the reader to it."""
    missing = []
    for file in repository_files():
        if not (file.endswith(".py") or file in (".ci/run", "Dockerfile")) or file == "tests/test_docs.py":
            continue  # this file names paths as data
        text = (ROOT / file).read_text(encoding="utf-8")
        for cited in re.findall(r"(?<![\w/.:-])((?:bridge|tests|bench|docs|deploy)/[\w./-]*[\w/])", text):
            if not (ROOT / cited).exists() and (file, cited) not in STALE_IN_CODE:
                missing.append(f"{file}: {cited}")
    assert missing == []


# Names in the docs' code that look like environment variables but are not settings, each with
# why. Where the reason names a file of ours, the name is defined there (checked).
NOT_SETTINGS = {
    "LLM_API_KEY": "the reader's own variable in the ${NAME} example (docs/configuration.md)",
    "UNPARSABLE_CLIENT_MESSAGE": "a Deepgram error code",
    "CLIENT_MESSAGE_TIMEOUT": "a Deepgram error code",
    "ERR_NGROK_4018": "ngrok's error for a missing authtoken",
    "SO_REUSEPORT": "a socket option",
    "AGENT_OPEN": "a timer of the call core, bridge/call/actions.py",
    "HANGUP_GRACE": "a timer of the call core, bridge/call/actions.py",
    "HANGUP_FALLBACK": "a timer of the call core, bridge/call/actions.py",
    "NO_FEED": "the phone call's browser feed, bridge/call/browser.py",
    "MAX_CONFIG_FILE_BYTES": "a limit in bridge/config.py",
    "MAX_JSON_DEPTH": "a limit in bridge/config.py",
    "MAX_NESTING": "a limit in bridge/functions.py",
    "MAX_PENDING_CALLBACKS": "a limit in bridge/call_control.py",
    "CLAIM_SECONDS": "a deadline in bridge/call_control.py",
    "RECORD_NAME": "the pattern of a record file's name, bridge/records.py",
    "MAX_RESULT_CHARS": "a limit in bridge/functions.py",
    "RELOAD_TIMEOUT_SECONDS": "a limit in bridge/server.py",
}


def mentioned_variables(text: str) -> set[str]:
    """Names like environment variables (capitals, digits, an underscore) in the inline code of
    ``text``, and those its code blocks assign (``NAME=value`` lines)."""
    shaped = r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b"
    names = {name for span in inline_code(text) for name in re.findall(shaped, span)}
    return names | set(re.findall(r"^[ \t]*([A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9])=", text, flags=re.M))


def test_the_variable_finder_finds_inline_names_and_assignments() -> None:
    text = "Set `TRANSFER_MODE` or `HOST`.\n\n```\nPUBLIC_URL=https://x\n```\nnot IN_PROSE\n"
    assert mentioned_variables(text) == {"TRANSFER_MODE", "PUBLIC_URL"}


def test_every_variable_the_docs_name_is_a_setting_or_explained() -> None:
    old = {old_name for _, setting in environment_fields() for old_name in setting.old_names}
    settings = documented_names() | old | set(DEPRECATED_LINE_VARIABLES)
    for name, reason in NOT_SETTINGS.items():
        assert name not in settings, f"{name} is a setting now: take it off NOT_SETTINGS"
        source = re.search(r"bridge/[\w/]+\.py", reason)
        if source:
            defined = re.search(rf"^\s*{name}\b.*=", (ROOT / source.group()).read_text(encoding="utf-8"), flags=re.M)
            assert defined, f"{name} is not defined in {source.group()}"
    for path in DOC_FILES:
        unknown = mentioned_variables(path.read_text(encoding="utf-8")) - settings - set(NOT_SETTINGS)
        assert unknown == set(), f"{path.relative_to(ROOT)} names variables the bridge does not read"


def test_the_layout_table_lists_every_module_and_top_level_entry() -> None:
    """docs/development.md's layout table: a row for each bridge/*.py (a package, such as
    bridge/call/, is one row) and for each file and folder at the top of the repository."""
    layout = section("Project layout", in_file="docs/development.md")
    rows = {path for cell in table_first_cells(layout) for path in re.findall(r"`([^`]+)`", cell)}
    files = repository_files()
    for module in (file for file in files if file.startswith("bridge/") and file.endswith(".py")):
        package = module.rsplit("/", 1)[0] + "/"
        if module == "bridge/__init__.py":
            continue  # empty: it only makes bridge/ a package
        assert module in rows or package in rows, f"the layout table has no row for {module}"
    for entry in {file.split("/")[0] + ("/" if "/" in file else "") for file in files}:
        covered = entry in rows or (entry.endswith("/") and any(row.startswith(entry) for row in rows))
        assert covered, f"the layout table has no row for {entry}"


def test_the_readme_is_short_and_starts_with_the_quick_start() -> None:
    lines = README.splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; move detail into docs/"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Quick start", "## Try it without a phone", "## Connect a Twilio number"]
    first_screen = "\n".join(lines[:60])
    assert "cp .env.example .env" in first_screen
    assert "pip install -r requirements.txt && python main.py" in first_screen


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {target.partition("#")[0] for target in relative_links(README)}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_performance_page_names_real_bench_flags() -> None:
    performance = read_doc(PERFORMANCE)
    assert "python -m bench" in performance
    assert "needs **Linux**" in performance, "the benchmark reads /proc: the page must say it needs Linux"
    bench = (ROOT / "bench" / "runner.py").read_text(encoding="utf-8")
    for flag in set(re.findall(r"(--[a-z][a-z-]*)", performance)) - {"--help"}:
        assert f'"{flag}"' in bench, f"{PERFORMANCE} names {flag}, which python -m bench lacks"


# -------------------------------------------------------------------------------- functions

def readme_example_function() -> tuple[Any, dict[str, Any]]:
    adding = section("Adding your own function", in_file=FUNCTIONS)
    python = next(block for block in code_blocks(adding, "python") if "def get_opening_hours" in block)
    namespace: dict[str, Any] = {}
    exec(compile(python, FUNCTIONS, "exec"), namespace)  # noqa: S102 - our own docs
    declaration = json.loads(next(block for block in code_blocks(adding, "json") if "get_opening_hours" in block))
    return namespace["get_opening_hours"], declaration


def test_readme_example_function_passes_the_startup_check_and_answers() -> None:
    function, declaration = readme_example_function()
    assert declaration["name"] == "get_opening_hours"
    assert check_function_map({"get_opening_hours": function}, {"get_opening_hours": declaration}) == []
    json.dumps(function("Saturday"))
    json.dumps(function())
    assert "error" in function("someday")


def test_readme_function_map_example_keeps_the_real_entries() -> None:
    from pharmacy_functions import function_map

    block = next(b for b in code_blocks(section("Adding your own function", in_file=FUNCTIONS), "python") if "function_map" in b)
    keys = set(re.findall(r'^\s+"(\w+)":', block, flags=re.M))
    assert keys == set(function_map) | {"get_opening_hours"}


def test_readme_pharmacy_table_lists_the_function_map() -> None:
    from pharmacy_functions import function_map

    names = {cell.strip("`") for cell in table_first_cells(section("The pharmacy store", in_file=FUNCTIONS))}
    assert names == set(function_map)


def _raises() -> None:
    raise RuntimeError("boom")


async def _slow() -> None:
    import asyncio

    await asyncio.sleep(5)


def _drug(drug_name: str) -> dict[str, str]:
    return {"drug": drug_name}


# First column of the error table in docs/functions.md (a distinctive part of it) -> how to cause that case.
ERROR_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "No such function": ({}, "{}"),
    "is not JSON": ({"X": _drug}, "{"),
    "is not a JSON object": ({"X": _drug}, "[1]"),
    "missing or unexpected": ({"X": _drug}, "{}"),
    "`arguments` nested": ({"X": _drug}, '{"drug_name": ' + "[" * 40 + "]" * 40 + "}"),
    "raised an exception": ({"X": _raises}, "{}"),
    "isn't JSON-serialisable": ({"X": lambda: object()}, "{}"),
    "64 KB": ({"X": lambda: "x" * 70_000}, "{}"),
    "FUNCTION_TIMEOUT_SECONDS": ({"X": _slow}, "{}"),
}


def readme_error_table() -> dict[str, str]:
    rows = re.findall(r'^\| ([^|]+) \| `(\{"error": .*?\})` \|', section("Adding your own function", in_file=FUNCTIONS), flags=re.M)
    return {case.strip(): answer for case, answer in rows}


def test_readme_error_table_covers_every_case() -> None:
    table = readme_error_table()
    assert len(table) == len(ERROR_CASES)
    for key in ERROR_CASES:
        assert any(key in case for case in table), f"the error table in {FUNCTIONS} has no row for {key!r}"


@pytest.mark.parametrize("key", sorted(ERROR_CASES))
async def test_readme_error_table_matches_the_real_answers(key: str) -> None:
    function_map, arguments = ERROR_CASES[key]
    documented = next(answer for case, answer in readme_error_table().items() if key in case)
    runner = FunctionRunner(function_map, timeout_seconds=0.1)
    try:
        outcome = await runner.run("X", arguments, logging.LoggerAdapter(logging.getLogger("test_docs")))
    finally:
        runner.close()
    assert json.loads(outcome.content) == json.loads(documented)


# ---------------------------------------------------------------------------------- records

def test_readme_lists_every_record_event() -> None:
    """The record's events are one vocabulary (RecordEvent): each is emitted somewhere, and documented."""
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "bridge").rglob("*.py"))
    emitted = {event.value for event in RecordEvent if f"RecordEvent.{event.name}" in source}
    assert set(RecordEvent) - {RecordEvent.SUMMARY} <= emitted, "a RecordEvent nothing emits"
    documented = {cell.strip("`") for cell in table_first_cells(section("Call records", in_file=CALL_RECORDS))}
    assert documented == emitted - {RecordEvent.SUMMARY.value}


def test_readme_lists_every_summary_field() -> None:
    from_call = set(Call(Settings(deepgram_api_key="unused"), AgentCatalog.single(AgentConfig({}, {}))).summary())
    assert "call_sid" in from_call
    fields = set(CallRecord(Path("unused"), False, RecordWriter()).summary()) | from_call
    records = section("Call records", in_file=CALL_RECORDS)
    for field in fields - {"event"}:
        assert f"`{field}`" in records, f"{CALL_RECORDS} does not mention the summary field {field}"


# ----------------------------------------------------------------------------------- Docker

def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    base = next(args for op, args in instructions if op == "FROM")
    assert re.fullmatch(r"python:3\.(1[1-9])-slim", base.strip()), base
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    healthchecks = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    # The check runs python -c "...": that code must at least compile.
    command = json.loads(healthchecks[0][healthchecks[0].index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")
    assert ("EXPOSE", "5000") in instructions
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert json.loads(next(args for op, args in instructions if op == "CMD")) == ["python", "main.py"]
    # The bridge's own default (127.0.0.1) would be unreachable through the published port.
    environment = " ".join(args for op, args in instructions if op == "ENV")
    assert re.search(r"(?:^|\s)HOST=0\.0\.0\.0(?:\s|$)", environment), "the image must listen on every interface"


def test_dockerfile_installs_and_copies_what_the_bridge_needs() -> None:
    runs = " ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    uvloop_pin = re.search(r"^uvloop==([\d.]+)", (ROOT / "requirements-dev.txt").read_text(), flags=re.M)
    assert uvloop_pin and f"uvloop=={uvloop_pin.group(1)}" in runs, "the image's uvloop should match requirements-dev.txt"
    copied = " ".join(args for op, args in dockerfile_instructions() if op == "COPY")
    for needed in ("requirements.txt", "main.py", "config.json", "pharmacy_functions.py", "bridge/"):
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.splitlines() if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", ".ci-venv", ".git", "calls", "data"} <= ignored
    assert not ignored & {"requirements.txt", "main.py", "config.json", "pharmacy_functions.py", "bridge"}


# ------------------------------------------------------------------------------- Kubernetes

def parse_yaml_subset(text: str) -> list[Any]:
    """A tiny YAML reader for the subset deploy/kubernetes.yaml uses: block mappings and lists,
    full-line comments, ``---`` between documents, and scalars (quoted, int, bool, flow JSON)."""

    def scalar(raw: str) -> Any:
        raw = raw.strip()
        if raw[:1] in {'"', "[", "{"}:
            return json.loads(raw)
        if re.fullmatch(r"-?\d+", raw):
            return int(raw)
        return {"true": True, "false": False}.get(raw, raw)

    def block(lines: list[tuple[int, str, int]], i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(lines, i, indent)
        return mapping(lines, i, indent)

    def mapping(lines: list[tuple[int, str, int]], i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("-"):
            _, content, number = lines[i]
            match = re.fullmatch(r"([^\s:\"'#]+):(?:\s+(.*))?", content)
            assert match, f"kubernetes.yaml line {number}: expected 'key: value', got {content!r}"
            key, rest = match.group(1), match.group(2)
            assert key not in result, f"kubernetes.yaml line {number}: duplicate key {key!r}"
            i += 1
            if rest:
                result[key] = scalar(rest)
            elif i < len(lines) and lines[i][0] > indent:
                result[key], i = block(lines, i, lines[i][0])
            else:
                result[key] = None
        return result, i

    def sequence(lines: list[tuple[int, str, int]], i: int, indent: int) -> tuple[list[Any], int]:
        result: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            _, content, number = lines[i]
            item = content[1:].strip()
            if re.match(r"[^\s:\"'#\[{]+:(\s|$)", item):
                lines[i] = (indent + 2, item, number)  # "- key: value" opens a mapping
                value, i = mapping(lines, i, indent + 2)
            elif item:
                value, i = scalar(item), i + 1
            else:
                value, i = block(lines, i + 1, lines[i + 1][0])
            result.append(value)
        return result, i

    documents = []
    for chunk in re.split(r"^---\s*$", text, flags=re.M):
        lines = []
        for number, line in enumerate(chunk.splitlines(), start=1):
            assert "\t" not in line, f"kubernetes.yaml line {number}: tabs are not allowed in YAML"
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((len(line) - len(line.lstrip(" ")), line.strip(), number))
        if not lines:
            continue
        value, end = block(lines, 0, lines[0][0])
        assert end == len(lines), f"kubernetes.yaml: unexpected indentation at {lines[end][1]!r}"
        documents.append(value)
    return documents


def test_the_yaml_reader_reads_what_it_claims() -> None:
    text = 'a:\n  b: 1\n  c:\n    - name: x\n      v: "5"\n    - y\n  d: ["sleep", "10"]\n  e: {}\n---\nf: true\n'
    assert parse_yaml_subset(text) == [
        {"a": {"b": 1, "c": [{"name": "x", "v": "5"}, "y"], "d": ["sleep", "10"], "e": {}}},
        {"f": True},
    ]
    with pytest.raises(AssertionError):
        parse_yaml_subset("a:\n  b: 1\n c: 2\n")


def test_kubernetes_example_drains_before_it_is_killed() -> None:
    documents = {doc["kind"]: doc for doc in parse_yaml_subset(KUBERNETES)}
    assert set(documents) == {"Deployment", "Service"}
    deployment, service = documents["Deployment"], documents["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}  # not valueFrom
    port = int(env.get("PORT", 5000))
    assert port in ports.values()

    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/health", probe
        assert ports.get(check["port"], check["port"]) == port, probe

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = float(env.get("DRAIN_TIMEOUT_SECONDS", load_settings({"DEEPGRAM_API_KEY": "k"}).drain_timeout_seconds))
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 30 and grace >= pre_stop + drain + 5, "terminationGracePeriodSeconds must cover preStop + DRAIN_TIMEOUT_SECONDS"

    # The bridge's own default (127.0.0.1) would be unreachable from outside the pod.
    assert env.get("HOST") == "0.0.0.0", "the pod must listen on every interface"
    assert any("secretRef" in source for source in container["envFrom"]), "keys come from a Secret"
    assert "DEEPGRAM_API_KEY" not in env and "TWILIO_AUTH_TOKEN" not in env, "keys belong in the Secret"
    # The manifest's values (with the Secret's keys) must be settings the bridge accepts.
    load_settings({"DEEPGRAM_API_KEY": "k", "TWILIO_AUTH_TOKEN": "t", **env})

    user = next(args for op, args in dockerfile_instructions() if op == "USER").split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user, "runAsUser should be the image's user"

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == port


def test_readme_summarises_the_kubernetes_example() -> None:
    kubernetes = section("Kubernetes", in_file=DEPLOYMENT)
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", KUBERNETES)
    sleep = re.search(r'command: \["sleep", "(\d+)"\]', KUBERNETES)
    assert grace and f"terminationGracePeriodSeconds: {grace.group(1)}" in kubernetes
    assert sleep and f"sleeps {sleep.group(1)} s" in kubernetes
    for term in ("readiness probe", "liveness probe", "preStop", "Secret", "Service", "deploy/kubernetes.yaml"):
        assert term in kubernetes, term


async def test_dockerfile_healthcheck_command_really_checks_health(fake_agent: Any, make_bridge: Any) -> None:
    """No Docker engine here, so run the HEALTHCHECK's own command against a live server."""
    import asyncio
    import subprocess
    import sys

    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", DOCKERFILE)
    assert match, "HEALTHCHECK ... CMD [...] not found"
    command = json.loads(match.group(1))
    assert command[0] == "python"

    def run(port: int) -> int:
        env = {**os.environ, "PORT": str(port)}
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10).returncode

    async with make_bridge(fake_agent) as server:
        assert await asyncio.to_thread(run, server.port) == 0
        server.draining = True  # /health answers 503 while draining: the check must fail
        assert await asyncio.to_thread(run, server.port) != 0


def test_architecture_names_every_event_and_action_of_the_call_core() -> None:
    """docs/architecture.md's lists of the core's events and actions are complete: a new event
    method of ``Call`` or a new action type fails here until the page names it."""
    import inspect
    import typing

    from bridge.call import actions

    page = (ROOT / "docs" / "architecture.md").read_text()
    properties = {name for name, value in vars(Call).items() if isinstance(value, property)}
    events = {
        name for name, method in inspect.getmembers(Call, inspect.isfunction)
        if not name.startswith("_") and name not in properties and name != "summary"
    }
    action_types = {kind.__name__ for kind in typing.get_args(actions.Action)}
    assert len(events) > 20 and len(action_types) > 20
    missing = sorted(name for name in events | action_types if f"`{name}`" not in page)
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_the_housekeeping_the_docs_call_hourly_runs_every_hour() -> None:
    """Retention and the shared state's forgetting are documented as hourly: that is the server's interval."""
    from bridge.server import HOUSEKEEPING_INTERVAL_SECONDS

    assert "at startup and hourly" in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "every hour while it serves" in (ROOT / "docs" / "call-records.md").read_text(encoding="utf-8")
    assert "the hourly housekeeping" in (ROOT / "docs" / "privacy.md").read_text(encoding="utf-8")
    assert HOUSEKEEPING_INTERVAL_SECONDS == 3600


def test_the_phase_table_in_architecture_md_is_the_machines_table() -> None:
    """Each phase's row says where the phase can go: the same moves, to the same phases, as
    phase.TRANSITIONS allows (one arrow per move), so a move added to either shows in both."""
    from bridge.call.phase import TRANSITIONS, Phase

    names = {"waiting for start": Phase.WAITING_FOR_START, "opening the agent": Phase.OPENING_AGENT,
             "opening": Phase.OPENING_AGENT, "conversing": Phase.CONVERSING, "resuming": Phase.RESUMING,
             "ended": Phase.ENDED}
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (waiting for start|opening the agent|conversing|resuming|ended) \|[^|]*\| ([^|]*) \|$", architecture, re.M)
    assert {names[phase] for phase, _ in rows} == set(Phase) and len(rows) == len(Phase), rows
    for phase, leaves in rows:
        targets = re.findall(r"→ ([a-z]+)", leaves)
        moves = TRANSITIONS[names[phase]]
        assert len(targets) == len(moves), f"{phase}: the docs give {len(targets)} moves, the table {len(moves)}"
        assert {names[target] for target in targets} == set(moves.values()), phase


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_repository_path_in_the_docs_prose_and_code_blocks_exists(path: Path) -> None:
    """Not only inline code: a path under one of our folders written in prose or in a code block
    (``python bench/runner.py``, "see tests/fakes.py") sends the reader to it as well."""
    text = path.read_text(encoding="utf-8")
    cited = re.findall(r"(?<![\w/.:-])((?:bridge|tests|bench|docs|deploy)/[\w./-]*[\w/])", text)
    missing = sorted({name for name in cited if "*" not in name and not (ROOT / name).exists()})
    assert missing == [], f"{path.relative_to(ROOT)} names files the repository does not have"


def test_the_wait_for_rest_requests_call_control_md_states_is_the_sessions() -> None:
    """An ending call waits this long for its REST requests (a pharmacist's call still being created)."""
    from bridge.call_requests import REST_SECONDS

    page = " ".join((ROOT / "docs" / "call-control.md").read_text(encoding="utf-8").split())
    assert f"within the {REST_SECONDS:g} seconds an ending call waits for its REST requests" in page
