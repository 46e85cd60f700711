"""Recipe loader: sections, flat files, args.yaml round trip, and one clear message per mistake."""
import pytest
import yaml

import train_kd
from config import RecipeError, load_recipe, parse_args_with_recipe


def _write(tmp_path, text, name='r.yaml'):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_sectioned_recipe_sets_defaults_and_cli_overrides(tmp_path):
    path = _write(tmp_path, """
model: {model: resnet18, batch_size: 32}
optim: {opt: adamw, lr: 5e-3, opt_betas: [0.9, 0.99]}
distill: {distiller: kd, kd_weight: 0.25, scalekd_alpha_s3: [0.1, 0.2]}
aug: {hflip: 0}
""")
    args, text = parse_args_with_recipe(train_kd.build_parser(), ['--config', path, '--lr', '0.01', '--data-dir', 'x'])
    assert args.model == 'resnet18' and args.batch_size == 32
    assert args.lr == 0.01  # command line wins
    assert args.opt == 'adamw' and args.opt_betas == [0.9, 0.99]
    assert args.kd_weight == 0.25 and args.scalekd_alpha_s3 == [0.1, 0.2]
    assert args.hflip == 0.0 and isinstance(args.hflip, float)
    assert yaml.safe_load(text)['lr'] == 0.01


def test_flat_recipe_and_args_yaml_round_trip(tmp_path):
    args, text = parse_args_with_recipe(train_kd.build_parser(), ['--model', 'resnet18', '--data-dir', 'd', '--smoothing',
                                                             '0.2', '--model-kwargs', 'drop_rate=0.1'])
    path = _write(tmp_path, text, 'args.yaml')
    again, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', path])
    for k, v in vars(args).items():
        if k != 'config':
            assert getattr(again, k) == v, k


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = _write(tmp_path, 'optim:\n  learning_rate: 0.1\n  weight_decai: 0.05\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path, train_kd.build_parser())
    msg = str(e.value)
    assert path in msg and "'learning_rate'" in msg and "section 'optim'" in msg


def test_unknown_key_suggests_closest(tmp_path):
    path = _write(tmp_path, 'optim:\n  weight_decai: 0.05\n')
    with pytest.raises(RecipeError, match="did you mean 'weight_decay'"):
        load_recipe(path, train_kd.build_parser())


def test_key_in_two_sections(tmp_path):
    path = _write(tmp_path, 'optim: {lr: 0.1}\nsched: {lr: 0.2}\n')
    with pytest.raises(RecipeError, match="'lr' is set twice, in section 'optim' and in section 'sched'"):
        load_recipe(path, train_kd.build_parser())


@pytest.mark.parametrize('text,pattern', [
    ('optim: {lr: fast}', "key 'lr' in section 'optim' expects a number, got 'fast'"),
    ('model: {batch_size: 1.5}', "key 'batch_size' .* expects an integer"),
    ('ema: {model_ema: 1}', "key 'model_ema' .* expects a boolean"),
    ('distill: {scalekd_alpha_s3: [0.1]}', "key 'scalekd_alpha_s3' .* expects a list of numbers"),
    ('distill: {distiller: fitnet}', "key 'distiller' .* invalid choice: 'fitnet'"),
])
def test_wrong_type_or_choice(tmp_path, text, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(_write(tmp_path, text), train_kd.build_parser())


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file '.*nope.yaml' does not exist"):
        load_recipe(str(tmp_path / 'nope.yaml'), train_kd.build_parser())
    with pytest.raises(RecipeError, match='is not valid YAML'):
        load_recipe(_write(tmp_path, 'model: [unclosed'), train_kd.build_parser())


def test_cli_reports_recipe_error_and_exits(tmp_path, capsys):
    path = _write(tmp_path, 'model: {modle: resnet18}')
    with pytest.raises(SystemExit) as e:
        train_kd.main(['--config', path, '--data-dir', str(tmp_path)])
    assert e.value.code == 2
    assert "unknown key 'modle'" in capsys.readouterr().err


@pytest.mark.parametrize('name,text,where,lines', [
    ('r.yaml', 'model: {model: resnet18}\noptim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n',
     "key 'lr' is set twice in section 'optim'", 'lines 3 and 5'),
    ('args.yaml', 'epochs: 3\nlr: 0.1\nsmoothing: 0.1\nlr: 0.2\n', "key 'lr' is set twice at the top level",
     'lines 2 and 4'),
    ('r.yaml', 'model:\n  model_kwargs:\n    drop_rate: 0.1\n    drop_rate: 0.2\n',
     "key 'drop_rate' is set twice in 'model_kwargs' in section 'model'", 'lines 3 and 4'),
    ('r.yaml', 'model_kwargs: {drop_rate: 0.1, drop_rate: 0.2}\n', "key 'drop_rate' is set twice in 'model_kwargs'",
     'line 1'),
    ('r.yaml', 'optim: {lr: 0.1}\nsched: {sched: cosine}\noptim: {momentum: 0.9}\n',
     "key 'optim' is set twice at the top level", 'lines 1 and 3'),
])
def test_key_twice_in_one_mapping(tmp_path, name, text, where, lines):
    """PyYAML keeps the later value of a repeated key silently; the loader stops with the file, key and lines."""
    path = _write(tmp_path, text, name)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, train_kd.build_parser())
    assert str(e.value) == f"recipe '{path}': {where} ({lines}); keep one"


def test_key_twice_stops_train_and_validate(tmp_path, capsys, caplog):
    import validate
    path = _write(tmp_path, 'model: resnet18\nnum_classes: 3\nnum_classes: 4\n', 'args.yaml')
    with pytest.raises(SystemExit) as e:
        train_kd.main(['--config', path, '--data-dir', str(tmp_path)])
    assert e.value.code == 2
    assert "key 'num_classes' is set twice at the top level (lines 2 and 3)" in capsys.readouterr().err
    assert validate.main(['--config', path, '--data-dir', str(tmp_path)]) == 2
    assert "key 'num_classes' is set twice at the top level (lines 2 and 3)" in caplog.records[-1].getMessage()


def test_merge_keys_may_override(tmp_path):
    """A YAML merge (<<: *anchor) followed by an explicit key is an override, not a key given twice."""
    path = _write(tmp_path, 'model_kwargs: &kw {drop_rate: 0.1}\nteacher_kwargs: {<<: *kw, drop_rate: 0.2}\n')
    out = load_recipe(path, train_kd.build_parser())
    assert out['model_kwargs'] == {'drop_rate': 0.1} and out['teacher_kwargs'] == {'drop_rate': 0.2}
