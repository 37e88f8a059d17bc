"""devstack's reading of the HAProxy master CLI's ``show proc`` (the text below is HAProxy 2.6.12's)."""

from __future__ import annotations

from devstack.processes import Workers, parse_show_proc

SHOW_PROC = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
17103           master          2 [failed: 0]   0d00h00m09s     2.6.12-1+deb12u4
# workers
17240           worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
17203           worker          1               0d00h00m04s     2.6.12-1+deb12u4
17106           worker          2               0d00h00m09s     2.6.12-1+deb12u4
# programs

"""


def test_show_proc_names_the_current_and_the_old_workers() -> None:
    assert parse_show_proc(SHOW_PROC) == Workers(current=17240, old=(17203, 17106))


def test_show_proc_without_old_workers() -> None:
    text = SHOW_PROC.split("# old workers")[0] + "# programs\n"
    assert parse_show_proc(text) == Workers(current=17240, old=())
