#!/usr/bin/env python3
"""libvirt-domain.py: turn docs/examples/libvirt-domain.xml into a test domain.

    libvirt-domain.py EXAMPLE NAME SOCKET KERNEL INITRD SERIAL [CTL]

Keeps the example's vhost-user disk (its driver, its reconnect) and its shared
memfd memory backing exactly as they are: those are what case 10 tests.
Changes only what a test guest needs: the name, TCG (type='qemu'), direct
kernel boot of the qemu-tests kernel and initramfs, no reboot, the serial
console to the file SERIAL and, with CTL, a second serial port on the FIFOs
CTL.in/CTL.out (the --control channel of lib.sh). Prints the domain XML.
"""
import sys
import xml.etree.ElementTree as ET

example, name, sock, kernel, initrd, serial = sys.argv[1:7]
ctl = sys.argv[7] if len(sys.argv) > 7 else None

dom = ET.parse(example).getroot()
dom.set("type", "qemu")
dom.find("name").text = name
disks = [d for d in dom.iter("disk") if d.get("type") == "vhostuser"]
if len(disks) != 1:
    sys.exit("libvirt-domain.py: the example must have one vhostuser disk")
disks[0].find("source").set("path", sock)
if dom.find("memoryBacking/access").get("mode") != "shared":
    sys.exit("libvirt-domain.py: the example's memory is not shared")

osel = dom.find("os")
for e in list(osel):
    if e.tag != "type":
        osel.remove(e)
for tag, text in (("kernel", kernel), ("initrd", initrd),
                  ("cmdline", "console=ttyS0 quiet tsc=reliable panic=-1")):
    ET.SubElement(osel, tag).text = text
dom.find("on_reboot").text = "destroy"

# cpu mode='maximum' is TCG's "-cpu max" (the guest's fio uses crc32c).
cpu = dom.find("cpu")
if cpu is None:
    cpu = ET.Element("cpu")
    dom.insert(list(dom).index(osel) + 1, cpu)
cpu.attrib.clear()
cpu.set("mode", "maximum")
cpu.set("check", "none")

devices = dom.find("devices")
for e in list(devices):
    if e.tag in ("serial", "console"):
        devices.remove(e)
s = ET.SubElement(devices, "serial", type="file")
ET.SubElement(s, "source", path=serial)
ET.SubElement(s, "target", port="0")
if ctl:
    s = ET.SubElement(devices, "serial", type="pipe")
    ET.SubElement(s, "source", path=ctl)
    ET.SubElement(s, "target", port="1")
ET.indent(dom)
print(ET.tostring(dom, encoding="unicode"))
