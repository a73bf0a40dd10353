"""systemd unit-name rules: bus paths, validity, templates and drop-in directories."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provenanced.systemd.names import (
    UNIT_PATH_PREFIX,
    UNIT_TYPES,
    bus_label_escape,
    bus_label_unescape,
    could_define_unit,
    dropin_dirs_for,
    is_template,
    is_valid_unit_name,
    template_of,
    unescape_unit_path,
    unit_object_path,
    unit_suffix,
)

_NAME_CHARS = string.ascii_letters + string.digits + ":-_.\\"
unit_types = st.sampled_from(sorted(UNIT_TYPES))
# A prefix may not start with "@"; "." inside is allowed, the last dot starts the suffix.
prefixes = st.text(_NAME_CHARS, min_size=1, max_size=40)
instances = st.text(_NAME_CHARS + "@", min_size=1, max_size=40)


@st.composite
def unit_names(draw: st.DrawFn) -> str:
    """Plain, template and instance names as systemd accepts them."""
    prefix, kind, suffix = draw(prefixes), draw(st.sampled_from("pti")), draw(unit_types)
    if kind == "p":
        return f"{prefix}.{suffix}"
    if kind == "t":
        return f"{prefix}@.{suffix}"
    return f"{prefix}@{draw(instances)}.{suffix}"


class TestUnitObjectPath:
    """Unit names map to the object paths the manager uses."""

    @pytest.mark.parametrize(
        ("name", "label"),
        [
            ("foo.service", "foo_2eservice"),
            ("-.mount", "_2d_2emount"),
            ("-.slice", "_2d_2eslice"),
            ("getty@tty1.service", "getty_40tty1_2eservice"),
            ("foo_bar.service", "foo_5fbar_2eservice"),
            ("1foo.service", "_31foo_2eservice"),
            ("foo1.service", "foo1_2eservice"),
            ("", "_"),
            # Seen on a real systemd 252 in UnitNew signals.
            ("pk-debconf-helper.service", "pk_2ddebconf_2dhelper_2eservice"),
            (
                "tmp-pvdev.6wlQ-run-pk\\x2ddebconf\\x2dsocket.mount",
                "tmp_2dpvdev_2e6wlQ_2drun_2dpk_5cx2ddebconf_5cx2dsocket_2emount",
            ),
        ],
    )
    def test_known_paths(self, name: str, label: str) -> None:
        """Every byte outside [A-Za-z0-9], and a leading digit, becomes lowercase ``_xx``."""
        assert unit_object_path(name) == UNIT_PATH_PREFIX + label
        assert unescape_unit_path(UNIT_PATH_PREFIX + label) == name

    @given(st.text())
    def test_round_trip(self, name: str) -> None:
        """Any text survives escaping and unescaping unchanged."""
        assert unescape_unit_path(unit_object_path(name)) == name

    @given(st.text())
    def test_label_alphabet(self, name: str) -> None:
        """A label holds only [A-Za-z0-9_] and never starts with a digit: a valid path element."""
        label = bus_label_escape(name)
        assert set(label) <= set(string.ascii_letters + string.digits + "_")
        assert not label[0].isdigit()

    @pytest.mark.parametrize(
        ("label", "text"),
        [("_2E", "."), ("_zz", "_zz"), ("a_4", "a_4"), ("_", ""), ("__2d", "_-")],
    )
    def test_unescape_leniency(self, label: str, text: str) -> None:
        """Like systemd, uppercase hex decodes and anything that is not ``_xx`` stays literal."""
        assert bus_label_unescape(label) == text

    @pytest.mark.parametrize(
        "path",
        [
            "/org/freedesktop/systemd1",
            "/org/freedesktop/systemd1/job/42",
            UNIT_PATH_PREFIX,
            UNIT_PATH_PREFIX + "a/b",
        ],
    )
    def test_rejects_other_paths(self, path: str) -> None:
        """Only a single element below the unit prefix names a unit."""
        with pytest.raises(ValueError, match="not a unit object path"):
            unescape_unit_path(path)


class TestIsValidUnitName:
    """Names are judged by the rules of systemd's unit_name_is_valid()."""

    @pytest.mark.parametrize(
        "name",
        [
            "foo.service",
            "foo@.service",
            "foo@bar.service",
            "foo@bar@baz.service",  # the manager loads this one: the instance may hold "@"
            "-.mount",
            "a:b.socket",
            "foo\\x2dbar.mount",
            "foo.bar.timer",
            "x" * 247 + ".service",  # 255 characters
        ],
    )
    def test_valid(self, name: str) -> None:
        """Plain, template and instance names of a known type pass."""
        assert is_valid_unit_name(name)

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "foo",
            ".service",
            "foo.",
            "foo.bogus",
            "foo.Service",
            "@foo.service",
            "@.service",
            "foo bar.service",
            "foo/bar.service",
            "fö.service",
            "x" * 248 + ".service",  # 256 characters
        ],
    )
    def test_invalid(self, name: str) -> None:
        """Unknown types, empty prefixes, foreign characters and overlong names fail."""
        assert not is_valid_unit_name(name)

    @given(unit_names())
    def test_generated_names(self, name: str) -> None:
        """Every name built from the allowed alphabet and a known type is valid."""
        assert is_valid_unit_name(name) == (len(name) <= 255)


class TestCouldDefineUnit:
    @pytest.mark.parametrize(
        "path",
        [
            "/u/web.service",
            "/u/web@.service",
            "/u/default.target.wants/web.service",
            "/u/web.service.d/10-env.conf",
            "/u/service.d/all.conf",
        ],
    )
    def test_unit_files_and_dropins(self, path: str) -> None:
        """Unit names, enablement links and .conf drop-ins are what the manager reads."""
        assert could_define_unit(path)

    @pytest.mark.parametrize(
        "path", ["/u/README.md", "/u/huge.img", "/u/.web.service.swp", "/u/web.service~", "/u/a"]
    )
    def test_other_names(self, path: str) -> None:
        """Notes, images and editor leftovers never reach the manager."""
        assert not could_define_unit(path)


class TestUnitSuffix:
    """The type is what follows the last dot."""

    @pytest.mark.parametrize(
        ("name", "suffix"),
        [
            ("foo.service", "service"),
            ("a.b.timer", "timer"),
            ("foo@x.y.socket", "socket"),
            ("foo", ""),
        ],
    )
    def test_suffix(self, name: str, suffix: str) -> None:
        """The last dot separates the type."""
        assert unit_suffix(name) == suffix


class TestTemplateOf:
    """Instances name their template; everything else has none."""

    @pytest.mark.parametrize(
        ("name", "template"),
        [
            ("foo@bar.service", "foo@.service"),
            ("foo@bar@baz.service", "foo@.service"),
            ("foo@a.b.timer", "foo@.timer"),
            ("foo@.service", None),
            ("foo.service", None),
        ],
    )
    def test_template(self, name: str, template: str | None) -> None:
        """The instance string, up to the last dot, is dropped."""
        assert template_of(name) == template

    @given(prefixes, instances, unit_types)
    def test_instance_round_trip(self, prefix: str, instance: str, kind: str) -> None:
        """An instance's template is the prefix with an empty instance, and itself valid."""
        template = template_of(f"{prefix}@{instance}.{kind}")
        assert template == f"{prefix}@.{kind}"
        assert len(template) > 255 or is_valid_unit_name(template)


class TestIsTemplate:
    @pytest.mark.parametrize(
        ("name", "template"),
        [
            ("foo@.service", True),
            ("foo@bar.service", False),
            ("foo@bar@.service", False),
            ("foo.service", False),
            ("@.service", True),
            (".service", False),
            ("", False),
        ],
    )
    def test_template(self, name: str, template: bool) -> None:
        """A template's first "@" sits right before the suffix, as unit_name_is_valid() has it."""
        assert is_template(name) is template

    @given(prefixes, instances, unit_types)
    def test_an_instance_is_not_its_template(self, prefix: str, instance: str, kind: str) -> None:
        """Every instance is no template, and the name template_of gives it is one."""
        name = f"{prefix}@{instance}.{kind}"
        assert not is_template(name)
        assert is_template(template_of(name) or "")


class TestDropinDirsFor:
    """Drop-in directories, least specific first, as systemd 252 consults them."""

    @pytest.mark.parametrize(
        ("name", "dirs"),
        [
            ("foo.service", ("service.d", "foo.service.d")),
            (
                "foo-bar-baz.service",
                ("service.d", "foo-.service.d", "foo-bar-.service.d", "foo-bar-baz.service.d"),
            ),
            # Checked against DropInPaths of a real manager.
            (
                "pv-a-b@x.service",
                (
                    "service.d",
                    "pv-.service.d",
                    "pv-a-.service.d",
                    "pv-a-b@.service.d",
                    "pv-a-b@x.service.d",
                ),
            ),
            ("foo@bar.socket", ("socket.d", "foo@.socket.d", "foo@bar.socket.d")),
            ("foo@.service", ("service.d", "foo@.service.d")),
            (
                "foo--bar.service",
                ("service.d", "foo-.service.d", "foo--.service.d", "foo--bar.service.d"),
            ),
            ("foo-.service", ("service.d", "foo-.service.d")),
            ("-.slice", ("slice.d", "-.slice.d")),
            ("-foo.service", ("service.d", "-foo.service.d")),
            ("a-b@c-d.timer", ("timer.d", "a-.timer.d", "a-b@.timer.d", "a-b@c-d.timer.d")),
        ],
    )
    def test_known_names(self, name: str, dirs: tuple[str, ...]) -> None:
        """Type dir, dash prefixes, template and the unit's own, in that order."""
        assert dropin_dirs_for(name) == dirs

    def test_rejects_invalid_names(self) -> None:
        """A name systemd would refuse has no drop-in directories."""
        with pytest.raises(ValueError, match="not a valid unit name"):
            dropin_dirs_for("foo.bogus")

    @given(unit_names())
    def test_shape(self, name: str) -> None:
        """Type dir first, own dir last, no repeats, every entry a ``.d`` of a valid name."""
        if len(name) > 255:
            return
        dirs = dropin_dirs_for(name)
        assert dirs[0] == f"{unit_suffix(name)}.d"
        assert dirs[-1] == f"{name}.d"
        assert len(set(dirs)) == len(dirs)
        assert all(is_valid_unit_name(d.removesuffix(".d")) for d in dirs[1:])
