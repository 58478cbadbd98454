"""The iPXE scripts, compared whole: what each action renders to."""

import textwrap

import pytest

from bootrules.rules.loader import parse_rules
from bootrules.decide.render import render_entry, render_no_match, render_rule


def rendered(rule_yaml: str) -> str:
    ruleset = parse_rules("rules:\n" + textwrap.indent(textwrap.dedent(rule_yaml).strip("\n"), "  ") + "\n")
    return render_rule(ruleset.rules[0])


def script(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# Appended to a case that ends with its indentation, so the first line carries none.
FAIL_TAIL = """\
exit 0
        :bootrules_failed
        echo bootrules: rule '{name}': {action} failed; falling back to the next boot device
        exit 1
"""

CASES = [
    pytest.param(
        """
        - name: lab-rescue
          match: {mac: "00:12:34:56:78:90"}
          chain: http://pxe.example.com/pxelinux.0
        """,
        """
        #!ipxe
        # bootrules: rule 'lab-rescue' (line 2)
        chain --replace --autofree http://pxe.example.com/pxelinux.0 || goto bootrules_failed
        """ + FAIL_TAIL.format(name="lab-rescue", action="chain"),
        id="chain",
    ),
    pytest.param(
        """
        - name: db01
          set:
            initiator-iqn: iqn.2007-08.com.example.initiator:initiator
            username: db01
            password: s3cret
          sanboot: iscsi:san.example.com:6:3260:0:iqn.2007-08.com.example.san:sometarget
        """,
        """
        #!ipxe
        # bootrules: rule 'db01' (line 2)
        set initiator-iqn iqn.2007-08.com.example.initiator:initiator || goto bootrules_failed
        set username db01 || goto bootrules_failed
        set password s3cret || goto bootrules_failed
        sanboot iscsi:san.example.com:6:3260:0:iqn.2007-08.com.example.san:sometarget || goto bootrules_failed
        """ + FAIL_TAIL.format(name="db01", action="sanboot"),
        id="sanboot-iscsi-with-set",
    ),
    pytest.param(
        """
        - name: multipath
          sanboot:
            uri: [http://a.example.com/disk.img, http://b.example.com/disk.img]
            drive: 0x81
            no-describe: true
            keep: true
            filename: \\EFI\\BOOT\\BOOTX64.EFI
        """,
        """
        #!ipxe
        # bootrules: rule 'multipath' (line 2)
        sanboot --drive 0x81 --no-describe --keep --filename \\EFI\\BOOT\\BOOTX64.EFI http://a.example.com/disk.img http://b.example.com/disk.img || goto bootrules_failed
        """ + FAIL_TAIL.format(name="multipath", action="sanboot"),
        id="sanboot-http-multipath-options",
    ),
    pytest.param(
        """
        - name: local-bios-disk
          sanboot: {drive: 0x80}
        """,
        """
        #!ipxe
        # bootrules: rule 'local-bios-disk' (line 2)
        sanboot --drive 0x80 || goto bootrules_failed
        """ + FAIL_TAIL.format(name="local-bios-disk", action="sanboot"),
        id="sanboot-local-drive",
    ),
    pytest.param(
        """
        - name: installer
          boot:
            kernel: http://mirror.example.com/linux
            initrd: [http://mirror.example.com/initrd.gz, http://mirror.example.com/firmware.cpio.gz]
            args: auto=true priority=critical
        """,
        """
        #!ipxe
        # bootrules: rule 'installer' (line 2)
        kernel http://mirror.example.com/linux initrd=initrd.gz initrd=firmware.cpio.gz auto=true priority=critical || goto bootrules_failed
        initrd --name initrd.gz http://mirror.example.com/initrd.gz || goto bootrules_failed
        initrd --name firmware.cpio.gz http://mirror.example.com/firmware.cpio.gz || goto bootrules_failed
        boot || goto bootrules_failed
        """ + FAIL_TAIL.format(name="installer", action="boot"),
        id="boot",  # the initrds named on the command line, for a UEFI kernel's EFI stub
    ),
    pytest.param(
        """
        - name: named-by-hand
          boot:
            kernel: http://m/linux
            initrd: [http://m/a/initrd, http://m/b/initrd, "http://m/c?v=${serial}"]
            args: initrd=initrd.magic quiet
        """,
        """
        #!ipxe
        # bootrules: rule 'named-by-hand' (line 2)
        kernel http://m/linux initrd=initrd.magic quiet || goto bootrules_failed
        initrd http://m/a/initrd || goto bootrules_failed
        initrd http://m/b/initrd || goto bootrules_failed
        initrd http://m/c?v=${serial} || goto bootrules_failed
        boot || goto bootrules_failed
        """ + FAIL_TAIL.format(name="named-by-hand", action="boot"),
        id="boot-initrd-named-in-args",  # what the rule says is left alone
    ),
    pytest.param(
        """
        - name: everyone-else
          exit: true
        """,
        """
        #!ipxe
        # bootrules: rule 'everyone-else' (line 2)
        echo bootrules: rule 'everyone-else': booting from the next boot device
        exit 1
        """,
        id="exit",
    ),
    pytest.param(
        """
        - name: exit-zero
          exit: 0
        """,
        """
        #!ipxe
        # bootrules: rule 'exit-zero' (line 2)
        echo bootrules: rule 'exit-zero': booting from the next boot device
        exit 0
        """,
        id="exit-status",
    ),
    pytest.param(
        """
        - name: exit-after-set
          set: {hostname: lab1}
          exit: true
        """,
        """
        #!ipxe
        # bootrules: rule 'exit-after-set' (line 2)
        set hostname lab1 || goto bootrules_failed
        echo bootrules: rule 'exit-after-set': booting from the next boot device
        exit 1
        :bootrules_failed
        echo bootrules: rule 'exit-after-set': set failed; falling back to the next boot device
        exit 1
        """,
        id="exit-with-set",  # a failed set has a label to jump to
    ),
    pytest.param(
        """
        - name: lab-menu
          set: {user-class: lab}
          menu:
            title: Lab machines
            timeout: 10s
            default: local
            items:
              - {key: local, label: Boot from local disk, exit: true}
              - key: debian
                label: Install Debian 13
                set: {hostname: lab1}
                boot: {kernel: "http://m/linux", initrd: "http://m/initrd.gz", args: "auto=true url=http://${next-server}/p"}
              - {key: rescue, label: Rescue (netboot.xyz), chain: "https://boot.netboot.xyz"}
        """,
        """
        #!ipxe
        # bootrules: rule 'lab-menu' (line 2)
        set user-class lab || goto bootrules_failed
        menu Lab machines || goto bootrules_failed
        item bootrules-item-local Boot from local disk || goto bootrules_failed
        item bootrules-item-debian Install Debian 13 || goto bootrules_failed
        item bootrules-item-rescue Rescue (netboot.xyz) || goto bootrules_failed
        choose --timeout 10000 --default bootrules-item-local bootrules-choice || goto bootrules_failed
        goto ${bootrules-choice} || goto bootrules_failed
        :bootrules-item-local
        echo bootrules: rule 'lab-menu', item 'local': booting from the next boot device
        exit 1
        :bootrules-item-debian
        set hostname lab1 || goto bootrules_failed
        kernel http://m/linux initrd=initrd.gz auto=true url=http://${next-server}/p || goto bootrules_failed
        initrd --name initrd.gz http://m/initrd.gz || goto bootrules_failed
        boot || goto bootrules_failed
        exit 0
        :bootrules-item-rescue
        chain --replace --autofree https://boot.netboot.xyz || goto bootrules_failed
        exit 0
        :bootrules_failed
        echo bootrules: rule 'lab-menu': menu item ${bootrules-choice} failed; falling back to the next boot device
        exit 1
        """,
        id="menu",
    ),
]


@pytest.mark.parametrize("rule_yaml,expected", CASES)
def test_each_action_renders_to_this_whole_script(rule_yaml, expected):
    """Every action's script is exactly the expected text, failure path included."""
    assert rendered(rule_yaml) == script(expected)


def test_no_match_script_exits_to_the_next_boot_device():
    """A machine no rule matches gets an explicit `exit`, never an error."""
    assert render_no_match() == script(
        """
        #!ipxe
        # bootrules: no rule matched this machine
        echo bootrules: no rule matched this machine; booting from the next boot device
        exit 1
        """
    )


def test_entry_script_reports_every_fact_with_free_text_in_hex():
    """The entry script chains /ipxe with the booting NIC's MAC and hex-encoded free text."""
    assert render_entry("http://boot.example.com/pxe/ipxe") == script(
        """
        #!ipxe
        # bootrules entry script: report what this machine is, then run what rules.yaml decides.
        chain --replace --autofree http://boot.example.com/pxe/ipxe?mac=${netX/mac:hexhyp}&uuid=${uuid}&serial_hex=${serial:hexraw}&product_hex=${product:hexraw}&manufacturer_hex=${manufacturer:hexraw}&asset_hex=${asset:hexraw}&hostname_hex=${hostname:hexraw}&ip=${netX/ip}&ip6=${netX/ip6}&platform=${platform}&buildarch=${buildarch} || goto bootrules_failed
        :bootrules_failed
        echo bootrules: could not fetch the boot decision from http://boot.example.com/pxe/ipxe
        echo bootrules: falling back to the next boot device
        exit 1
        """
    )


def test_a_once_rule_with_a_menu_sets_the_done_url_before_the_menu():
    """A `once:` menu rule sets ${bootrules-done} before the menu, for whichever item installs."""
    ruleset = parse_rules("rules:\n  - name: m\n    once: true\n    menu:\n      default: a\n"
                          "      timeout: 0\n      items: [{key: a, label: A, exit: true}]\n")
    lines = render_rule(ruleset.rules[0], done_url="http://b/done/T").splitlines()
    assert lines[2:4] == ["set bootrules-done http://b/done/T", "menu Boot menu || goto bootrules_failed"]
    assert "choose --default bootrules-item-a bootrules-choice || goto bootrules_failed" in lines  # 0: no timeout
