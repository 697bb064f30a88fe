#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    kubectl_gefyra::main().await
}
