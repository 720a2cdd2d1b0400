"""TrashWorldConfig validation and hand-built layouts."""

import pytest

from chisel.envs import Layout, LayoutError, TrashWorldConfig, TrashWorldConfigError


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"p_no_trash": 1.5}, "p_no_trash"),
        ({"p_blue_given_trash": -0.1}, "p_blue_given_trash"),
        ({"height": 0}, "height"),
        ({"height": 2, "width": 2}, "height"),
        ({"button": "sometimes"}, "button"),
        ({"view_radius": -1}, "view_radius"),
    ],
)
def test_bad_fields_raise_with_the_field_name(changes: dict, field: str) -> None:
    with pytest.raises(TrashWorldConfigError, match=f"TrashWorldConfig.{field}="):
        TrashWorldConfig(**changes)


def test_default_obs_is_small() -> None:
    cfg = TrashWorldConfig()
    assert cfg.obs_dim == 4 * 5 * 5 + 2 == 102
    assert cfg.replace(view_radius=1).obs_dim == 4 * 9 + 2


def test_layout_from_ascii() -> None:
    layout = Layout.from_ascii("""
        A . . . .
        . T . . .
        . . . . C
        . . B . .
        . T . . .
    """, wall_blue=True)
    assert layout == Layout(agent=(0, 0), can=(2, 4), trash=((1, 1), (4, 1)), button=(3, 2),
                            wall_blue=True)
    layout.check(TrashWorldConfig())


@pytest.mark.parametrize(
    ("picture", "message"),
    [("A . X\n. . C", "Unknown layout character 'X'"),
     ("A . .\n. . .", "exactly one C"),
     ("A B B\n. . C", "at most one B")],
)
def test_bad_pictures_raise(picture: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        Layout.from_ascii(picture)


def test_layout_check_catches_misfits() -> None:
    cfg = TrashWorldConfig()
    with pytest.raises(LayoutError, match="outside the 5x5 room"):
        Layout(agent=(5, 0), can=(0, 0)).check(cfg)
    with pytest.raises(LayoutError, match="raise n_trash"):
        Layout(agent=(0, 0), can=(1, 1), trash=((2, 2), (3, 3)), holding=True).check(cfg)
    with pytest.raises(LayoutError, match="share a cell"):
        Layout(agent=(0, 0), can=(1, 1), trash=((1, 1),)).check(cfg)
