//! The benchmark runner in smoke mode (one repetition, 0.5 s cases, tiny files) against
//! every target but GlusterFS, so `bench/suite.rs` cannot rot. Asserts only that every cell
//! got a finite positive figure and that the outputs are written; no timing is asserted.
//! bindfs is skipped, with a note, when it is not installed. GlusterFS is always left out:
//! the test suite must pass where it is not installed, and where it is, its volume set-up
//! and teardown would add seconds to every CI run; `bench/run --smoke` covers its column.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/mount.rs"]
mod mount;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "../bench/suite.rs"]
#[allow(dead_code)]
mod suite;
#[path = "common/tmpfs.rs"]
mod tmpfs;
#[path = "common/vere.rs"]
mod vere;

use std::fs;

#[test]
fn bench_smoke_every_cell_gets_a_figure() {
    let out = mount::TestDir::new("bench-smoke-out");
    let mut cfg = suite::Config::smoke();
    cfg.out_tsv = Some(out.join("results.tsv"));
    cfg.out_md = Some(out.join("table.md"));
    cfg.out_svg = Some(out.join("chart.svg"));
    if !suite::bindfs_available() {
        eprintln!("note: bindfs is not installed; the smoke run skips its column");
        cfg.targets.retain(|t| *t != suite::Target::Bindfs);
    }
    cfg.targets.retain(|t| *t != suite::Target::Gluster);
    let res = suite::run(&cfg);
    eprintln!("{}", res.table_text());
    res.write_outputs().expect("write results");
    assert!(res.errors.is_empty(), "cases failed: {:#?}", res.errors);
    let cells = cfg.expected_cells();
    assert!(cells.len() >= 40, "only {} cells", cells.len());
    for (m, t) in cells {
        let v = res.median(m, t);
        assert!(
            v.is_some_and(|v| v.is_finite() && v > 0.0),
            "{} on {}: {v:?}",
            m.key(),
            t.key()
        );
    }
    let tsv = fs::read_to_string(out.join("results.tsv")).unwrap();
    assert!(tsv.starts_with("metric\ttarget\t"), "{tsv}");
    let md = fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        md.contains("| workload |") && md.contains("seguro-fs 1 node"),
        "{md}"
    );
    let svg = fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
}
