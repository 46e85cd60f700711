"""The layout rules of docs/architecture.md, checked on the source (no code is run)."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('train_kd', 'validate', 'export')


def _tree(path):
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read())


def _imports(tree):
    """(module, names) of every absolute import of a file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


@pytest.mark.parametrize('path', sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'runtime', '*.py'))))
def test_runtime_files_are_small_and_import_nothing_above_them(path):
    with open(os.path.join(ROOT, path)) as f:
        assert len(f.read().splitlines()) <= 250
    for module, _ in _imports(_tree(path)):
        top = module.split('.')[0]
        assert top not in ('distillers', 'models', 'config', 'benchmarks') + SCRIPTS, f'{path} imports {module}'


def test_no_script_imports_another_scripts_private_names():
    for path in [f'{s}.py' for s in SCRIPTS] + sorted(glob.glob('benchmarks/*.py', root_dir=ROOT)):
        tree = _tree(path)
        for module, names in _imports(tree):
            if module in SCRIPTS:
                assert not [n for n in names if n.startswith('_')], f'{path} imports private names of {module}'
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in SCRIPTS:
                assert not node.attr.startswith('_'), f'{path} uses {node.value.id}.{node.attr}'


def test_training_script_sizes():
    with open(os.path.join(ROOT, 'train_kd.py')) as f:
        assert len(f.read().splitlines()) <= 1150
    funcs = {n.name: n.end_lineno - n.lineno + 1 for n in _tree('train_kd.py').body if isinstance(n, ast.FunctionDef)}
    assert funcs['train'] <= 120 and funcs['train_one_epoch'] <= 120 and funcs['student_step'] <= 120


def test_no_import_circle_between_scripts():
    """The scripts import each other one way only (train_kd -> validate, export -> validate): a circle would mean a
    second copy of a phase living in another script."""
    scripts = sorted(os.path.splitext(p)[0] for p in glob.glob('*.py', root_dir=ROOT))
    edges = {s: {m.split('.')[0] for m, _ in _imports(_tree(f'{s}.py'))} & set(scripts) - {s} for s in scripts}

    def reach(start, seen=()):
        for nxt in edges[start]:
            assert nxt not in seen + (start,), f'import circle: {" -> ".join(seen + (start, nxt))}'
            reach(nxt, seen + (start,))
    for s in scripts:
        reach(s)
    assert not os.path.exists(os.path.join(ROOT, 'joint.py'))  # one training loop: train_kd.py's
