//! Generates the Rust code of `switchyard/v1/*.proto` (needs `protoc`, see TOOLCHAIN).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["switchyard/v1/inference.proto", "switchyard/v1/control.proto", "switchyard/v1/admin.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchyard_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
