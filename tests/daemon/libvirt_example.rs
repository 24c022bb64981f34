//! docs/examples/libvirt-domain.xml: what a vhost-clone disk needs is there
//! (a vhostuser disk on a unix socket that reconnects, shared memfd memory),
//! and libvirt's own schema accepts it (`virt-xml-validate`, when libvirt's
//! clients are installed; qemu-tests case 10 always validates and boots it).

use std::path::Path;
use std::process::Command;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/examples/libvirt-domain.xml"
);

#[test]
fn the_example_has_what_vhost_user_needs() {
    let xml = std::fs::read_to_string(EXAMPLE).unwrap();
    for needed in [
        "<disk type='vhostuser' device='disk'>",
        "<driver name='qemu' type='raw' queues='2'/>",
        "<source type='unix' path='/run/vhost-clone/vm1.sock'>",
        "<reconnect enabled='yes' timeout='1'/>",
        "<source type='memfd'/>",
        "<access mode='shared'/>",
    ] {
        assert!(xml.contains(needed), "the example lacks {needed}");
    }
}

#[test]
fn libvirt_validates_the_example() {
    let tool = "/usr/bin/virt-xml-validate";
    if !Path::new(tool).exists() || !Path::new("/usr/bin/xmllint").exists() {
        eprintln!("skipped: virt-xml-validate or xmllint is not installed (libvirt-clients, libxml2-utils)");
        return;
    }
    let o = Command::new(tool)
        .args([EXAMPLE, "domain"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "virt-xml-validate: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
