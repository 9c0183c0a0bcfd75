"""Static cross-checks of the Slicer module that need neither Slicer nor Qt.

The GUI cannot run here, so what would only fail when a user opens the module in Slicer is
checked from the sources: names the Python uses exist in the .ui, the .ui's SlicerParameterName
properties name parameter-node fields of a type the parameterNodeWrapper can bind to that widget,
every Python file is packaged by CMake, torch is never imported at file scope, and the extension
metadata is consistent.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "CorrReg"
MODULE_PY = MODULE_DIR / "CorrReg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CorrReg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
INDEX_JSON = ROOT / "Resources" / "CorrReg.json"


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui_root().iter("widget")}


def _ui_property(widget: ET.Element, name: str):
    p = widget.find(f"property[@name='{name}']")
    if p is None:
        return None
    child = list(p)[0]
    if child.tag == "stringlist":
        return [s.text for s in child]
    return child.text


def _parameter_fields() -> dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class in CorrReg.py."""
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("CorrReg.py has no @parameterNodeWrapper class")


def _enum_classes() -> set[str]:
    out = set()
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases):
            out.add(node.name)
    return out


def _tracked_files(*paths: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: take what is on disk
        return [str(p.relative_to(ROOT)) for d in paths for p in (ROOT / d).rglob("*") if p.is_file()]


def _cmake_words(path: Path) -> set[str]:
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8")).replace("${MODULE_NAME}", "CorrReg")
    return set(re.findall(r"[A-Za-z0-9_./${}\-]+", text))


def _cmake_list(path: Path, variable: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    m = re.search(r"set\(\s*" + variable + r"\b(.*?)\)", text, re.S)
    assert m, f"{variable} is not set in {path}"
    return m.group(1).split()


# --------------------------------------------------------------------------------------------
# .ui <-> Python


def test_ui_is_well_formed_designer_xml():
    root = _ui_root()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "CorrReg"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    qt_builtin = {c for c in used if c.startswith("Q")}
    assert used - qt_builtin <= declared, f"undeclared custom widgets: {used - qt_builtin - declared}"


def test_every_ui_widget_named_in_python_exists():
    used = set()
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "the widget uses no self.ui.<name>?"
    missing = used - set(_ui_widgets())
    assert not missing, f"CorrReg.py uses widgets missing from CorrReg.ui: {sorted(missing)}"


def test_mrml_widgets_get_the_scene():
    root = _ui_root()
    connected = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    combos = {n for n, w in _ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos and combos <= connected, f"node selectors without setMRMLScene: {combos - connected}"


def test_parameter_names_bind_to_fields_of_a_matching_type():
    fields = _parameter_fields()
    enums = _enum_classes()
    bound = {}
    for name, w in _ui_widgets().items():
        pname = _ui_property(w, "SlicerParameterName")
        if pname is None:
            continue
        assert pname in fields, f"widget {name} binds to '{pname}', which is not a parameter node field"
        assert pname not in bound, f"'{pname}' is bound twice ({bound.get(pname)} and {name})"
        bound[pname] = name
        ann = ast.unparse(fields[pname])
        base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", ann)
        cls = w.get("class")
        # The connectors of slicer.parameterNodeWrapper.guiConnectors match exact widget classes.
        if base.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", (name, ann)
            assert _ui_property(w, "nodeTypes") == [base], f"{name}: nodeTypes must be [{base}]"
        elif base == "float":
            assert cls in ("QDoubleSpinBox", "ctkSliderWidget"), (name, ann)
            if cls == "ctkSliderWidget":
                assert "WithinRange" in ann, f"{name}: a ctkSliderWidget needs a bounded float (WithinRange)"
        elif base == "int":
            assert cls in ("QSpinBox", "QSlider"), (name, ann)
        elif base == "bool":
            assert cls in ("QCheckBox", "QPushButton"), (name, ann)
        elif base == "str":
            assert cls in ("QLineEdit", "QTextEdit") or (cls == "QComboBox" and "Choice" in ann), (name, ann)
        elif base in enums:
            assert cls == "QComboBox", (name, ann)
        else:
            raise AssertionError(f"{name}: no connector for parameter type {ann}")
    # Values a user sets in the GUI must all be stored; fields without a widget are fine.
    assert {"ctVolume", "xrayVolume", "method", "outputTransform", "opacity", "sdd"} <= set(bound)


def test_parameter_defaults_lie_within_their_ranges():
    tree = _module_tree()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "CorrRegParameterNode":
            for s in node.body:
                if isinstance(s, ast.AnnAssign) and "WithinRange" in ast.unparse(s.annotation) and s.value is not None:
                    lo, hi = (ast.literal_eval(a) for a in re.search(r"WithinRange\(([^)]*)\)", ast.unparse(s.annotation)).group(1).split(","))
                    assert lo <= ast.literal_eval(s.value) <= hi, s.target.id


def test_module_classes_follow_the_template():
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in _module_tree().body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["CorrReg"]
    assert {"ScriptedLoadableModuleWidget", "VTKObservationMixin"} <= set(classes["CorrRegWidget"])
    assert "ScriptedLoadableModuleLogic" in classes["CorrRegLogic"] and "CorrRegLogicCore" in classes["CorrRegLogic"]
    assert "ScriptedLoadableModuleTest" in classes["CorrRegTest"]
    text = MODULE_PY.read_text(encoding="utf-8")
    for needle in ("2402.02498", "ISBI", "ProST", "MICCAI 2020"):
        assert needle in text, f"the help/acknowledgement text lacks {needle!r}"
    assert "QTimer" in text, "the GUI must step the registration from a QTimer"


def test_only_the_module_script_sits_at_the_top_of_the_module_folder():
    # Slicer treats every top-level .py in qt-scripted-modules as a module; helpers go in a package.
    top = sorted(p.name for p in MODULE_DIR.glob("*.py"))
    assert top == ["CorrReg.py"], top


# --------------------------------------------------------------------------------------------
# torch never at file scope


def _file_scope_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, ast.Import):
                names.extend(a.name for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                names.append(s.module or "")
            elif isinstance(s, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(s, field, []) or [])
                for h in getattr(s, "handlers", []):
                    visit(h.body)
            # function and class bodies run later (class bodies run at import: visit them)
            elif isinstance(s, ast.ClassDef):
                visit(s.body)

    visit(tree.body)
    return names


@pytest.mark.parametrize("path", [MODULE_PY, *sorted((MODULE_DIR / "CorrRegModuleLib").glob("*.py"))], ids=lambda p: p.name)
def test_no_torch_or_corrreglib_import_at_file_scope(path):
    heavy = [n for n in _file_scope_imports(path) if n.split(".")[0] in ("torch", "CorrRegLib", "roma", "cma", "safetensors")]
    assert not heavy, f"{path.name} imports {heavy} at file scope; import them inside functions"


def test_logic_imports_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch blocked for this test')\n"
        "sys.meta_path.insert(0, Block()); sys.path.insert(0, %r)\n"
        "import CorrRegModuleLib.logic as L, CorrRegModuleLib.adapter, CorrRegModuleLib.selftest\n"
        "logic = L.CorrRegLogicCore(scene=__import__('slicer').vtkMRMLScene())\n"
        "assert 'torch' in logic.missingDependencies()\n"
        "try:\n    logic.requireDependencies()\nexcept ValueError as e:\n    assert 'PyTorch' in str(e); print('ok')\n"
    ) % str(MODULE_DIR)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# --------------------------------------------------------------------------------------------
# packaging


def test_every_python_file_is_listed_in_cmake():
    words = _cmake_words(MODULE_CMAKE) | _cmake_words(TOP_CMAKE)
    missing = []
    for f in _tracked_files("CorrReg", "CorrRegLib"):
        if not f.endswith(".py"):
            continue
        rel = f[len("CorrReg/"):] if f.startswith("CorrReg/") else f
        if rel not in words and f not in words:
            missing.append(f)
    assert not missing, f"Python files not packaged by CMake (add them to CorrReg/CMakeLists.txt): {missing}"


def test_every_listed_file_exists():
    for var, base in (("MODULE_PYTHON_SCRIPTS", MODULE_DIR), ("MODULE_PYTHON_RESOURCES", MODULE_DIR),
                      ("CORRREGLIB_PYTHON_SCRIPTS", ROOT), ("CORRREGLIB_PYTHON_RESOURCES", ROOT)):
        for item in _cmake_list(MODULE_CMAKE, var):
            item = item.replace("${MODULE_NAME}", "CorrReg")
            assert (base / item).is_file(), f"{var} lists {item}, which does not exist (CMake would fail)"


def test_bundled_models_are_packaged():
    listed = set(_cmake_list(MODULE_CMAKE, "CORRREGLIB_PYTHON_RESOURCES"))
    models = [f for f in _tracked_files("CorrRegLib/models") if not f.endswith(".py")]
    missing = [f for f in models if f not in listed]
    assert not missing, f"bundled model files not in CORRREGLIB_PYTHON_RESOURCES: {missing}"


def test_extension_cmake_has_the_template_structure():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for needle in ("project(CorrReg)", "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                   "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "PyTorch"',
                   "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(CorrReg)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    mod = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in mod and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in mod


def test_extensions_index_entry():
    entry = json.loads(INDEX_JSON.read_text(encoding="utf-8"))
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "enabled", "tier"}
    assert set(entry) <= allowed, f"keys the catalog schema forbids: {set(entry) - allowed}"
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Registration" and entry["scm_type"] == "git"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert f'EXTENSION_CATEGORY "{entry["category"]}"' in TOP_CMAKE.read_text(encoding="utf-8")


def test_requirements_match_the_logic_and_the_package():
    sys.path.insert(0, str(MODULE_DIR))
    from CorrRegModuleLib.logic import PIP_REQUIREMENTS, REQUIRED_PACKAGES

    lines = [l.strip() for l in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert sorted(lines) == sorted(PIP_REQUIREMENTS.values())
    assert set(PIP_REQUIREMENTS) | {"torch"} == set(REQUIRED_PACKAGES)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in REQUIRED_PACKAGES:
        assert f'"{name}' in pyproject, f"{name} is required by the module but not by the corrreg package"


def test_icon_is_a_128px_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "CorrReg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (128, 128)
