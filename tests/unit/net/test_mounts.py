"""Finding a file's mounts at every path (`net/_mounts.py`), from real mountinfo text."""

from matchlock.net._mounts import mounts_of, parse_mountinfo

# This machine while a chroot at /tmp/fresh/root (which had bound /run) kept a namespace.
MOUNTINFO = r"""27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw
46 45 0:4 net:[4026532178] /run/netns/mltest-765c61 rw shared:2 - nsfs nsfs rw
52 27 254:0 /tmp/fresh/root /tmp/fresh/root rw,relatime - ext4 /dev/vda rw
59 52 254:0 /run /tmp/fresh/root/run rw,relatime - ext4 /dev/vda rw
60 59 254:0 /run/netns /tmp/fresh/root/run/netns rw,relatime shared:3 - ext4 /dev/vda rw
61 60 0:4 net:[4026532250] /tmp/fresh/root/run/netns/ml-e742643b rw shared:4 - nsfs nsfs rw
62 59 0:4 net:[4026532251] /tmp/fresh/root/run/netns2/ml-e742643b rw - nsfs nsfs rw
63 27 254:0 /srv /srv\040x rw - ext4 /dev/vda rw
64 63 0:4 net:[4026532252] /srv\040x/ml-0 rw - nsfs nsfs rw
"""


def test_finds_the_chroot_mount_of_our_file():
    found = mounts_of(parse_mountinfo(MOUNTINFO), "/run/netns/ml-e742643b")
    assert [m.point for m in found] == ["/tmp/fresh/root/run/netns/ml-e742643b"]


def test_finds_the_direct_mount_and_not_other_names():
    found = mounts_of(parse_mountinfo(MOUNTINFO), "/run/netns/mltest-765c61")
    assert [m.id for m in found] == [46]
    assert mounts_of(parse_mountinfo(MOUNTINFO), "/run/netns/ml-00000000") == []


def test_same_name_in_another_directory_is_not_ours():
    # 62 sits on <root>/run/netns2, i.e. /run/netns2 in the filesystem: another file.
    found = mounts_of(parse_mountinfo(MOUNTINFO), "/run/netns/ml-e742643b")
    assert 62 not in [m.id for m in found]


def test_escaped_paths():
    found = mounts_of(parse_mountinfo(MOUNTINFO), "/srv/ml-0")
    assert [m.point for m in found] == ["/srv x/ml-0"]
