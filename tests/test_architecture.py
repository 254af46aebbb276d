"""The floors of README's Architecture section, enforced: no module imports from a higher floor, no
import cycle between modules, no module over the size a reader takes in at once. Imports are read from
the source (module level, inside functions and under TYPE_CHECKING alike): a lazy import is still a
dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deepliif", "engine", "export", "calibration")
MAX_LINES = 400

# lowest first; a module belongs to the floor of its longest matching prefix
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("deepliif",)),
    ("runners", ("engine.backends", "engine.samples", "engine.devices", "engine.checkout", "engine.errors",
                 "engine.settings", "engine.file_hashes")),
    ("export", ("export",)),
    ("calibration", ("calibration",)),
    ("artifacts", ("engine.cache", "engine.artifacts")),
    ("session", ("engine.session", "engine.slide_inference", "engine.bench", "engine.process_bench", "engine.doctor",
                 "engine.deepliif_way", "engine.image_files", "engine.replay", "engine.pipeline_bench",
                 "engine.triton_model")),
    ("kernel", ("engine.edi",)),
    ("commands", ("engine", "engine.cli", "engine.commands", "export.cli", "calibration.cli", "engine.edi.cli",
                  "engine.edi.deploy_cli",
                  "engine.edi.standin.demo", "engine.edi.standin.hostile_bench", "kernel")),
)


def module_names() -> dict[str, Path]:
    found = {"kernel": ROOT / "kernel.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def floor_of(name: str) -> int:
    best, best_length = None, -1
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = level, len(prefix)
    assert best is not None, f"{name} is on no floor: add it to FLOORS and README's Architecture section"
    return best


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_from_a_higher_floor() -> None:
    graph = import_graph()
    upward = [f"{name} ({FLOORS[floor_of(name)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
              for name, targets in sorted(graph.items()) for target in sorted(targets)
              if floor_of(target) > floor_of(name)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


# engine/edi's rooms: the stand-in of WMLA's runtime and the client-side tools build on the kernel proper;
# the kernel never imports either, and they never import each other
EDI_ROOMS = ("engine.edi.kernel", "engine.edi.standin", "engine.edi.tools")
EDI_ALLOWED = {"engine.edi.kernel": {"engine.edi.kernel"},
               "engine.edi.standin": {"engine.edi.standin", "engine.edi.kernel"},
               "engine.edi.tools": {"engine.edi.tools", "engine.edi.kernel"}}


def room_of(name: str) -> str | None:
    return next((room for room in EDI_ROOMS if name == room or name.startswith(room + ".")), None)


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} ({room_of(name)}) imports {target} ({room_of(target)})"
            for name, targets in sorted(graph.items()) if room_of(name)
            for target in sorted(targets) if room_of(target) and room_of(target) not in EDI_ALLOWED[room_of(name)]]


def test_the_edi_rooms_import_one_way() -> None:
    modules = module_names()
    assert {room_of(name) for name in modules if name.startswith("engine.edi.")} - {None} == set(EDI_ROOMS)
    loose = [name for name in modules if name.startswith("engine.edi.") and room_of(name) is None
             and floor_of(name) != len(FLOORS) - 1]
    assert not loose, f"engine/edi modules outside a room must be commands (CLIs): {loose}"
    violations = room_violations(import_graph())
    assert not violations, "\n".join(violations)


def test_the_checks_catch_what_they_forbid() -> None:
    graph = {"deepliif.tiling": {"engine.session"}, "engine.session": {"deepliif.tiling"}}
    assert cycles(graph) == [["deepliif.tiling", "engine.session"]]
    assert floor_of("engine.session") > floor_of("deepliif.tiling")
    assert floor_of("engine.edi.cli") > floor_of("engine.edi.kernel.service") > floor_of("engine.session")
    assert floor_of("engine.backends.precision") < floor_of("export.onnx_export")
    assert room_violations({"engine.edi.kernel.service": {"engine.edi.standin.server"},
                            "engine.edi.tools.cohort": {"engine.edi.standin.demo", "engine.edi.kernel.records"},
                            "engine.edi.standin.server": {"engine.edi.kernel.settings"}}) == [
        "engine.edi.kernel.service (engine.edi.kernel) imports engine.edi.standin.server (engine.edi.standin)",
        "engine.edi.tools.cohort (engine.edi.tools) imports engine.edi.standin.demo (engine.edi.standin)"]


def test_no_module_is_longer_than_a_reader_takes_in() -> None:
    long = {name: n for name, path in module_names().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_export_and_calibration_do_not_import_each_other() -> None:
    """Calibration builds on export; export (its command line included) never imports calibration."""
    graph = import_graph()
    back = [f"{name} imports {target}" for name, targets in sorted(graph.items()) if name.startswith("export")
            for target in sorted(targets) if target.startswith("calibration")]
    assert not back, back


def test_only_the_settings_module_reads_the_process_environment() -> None:
    """Entry points take `engine.settings.process_environment()` once and pass it on; nothing else reads it."""
    readers = sorted(name for name, path in module_names().items()
                     if any(isinstance(node, ast.Attribute) and node.attr == "environ"
                            and isinstance(node.value, ast.Name) and node.value.id == "os"
                            for node in ast.walk(ast.parse(path.read_text()))))
    assert readers == ["engine.settings"], readers
