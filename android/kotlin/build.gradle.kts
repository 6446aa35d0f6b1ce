plugins {
    id("com.android.library") version "8.7.3"
    id("org.jetbrains.kotlin.android") version "2.1.0"
}

// The Rust workspace is two levels up (android/kotlin → repository root).
val workspace = rootDir.parentFile.parentFile
val abis = listOf("arm64-v8a", "armeabi-v7a", "x86_64")
val rustLibs = layout.buildDirectory.dir("rustJniLibs")
val uniffiOut = layout.buildDirectory.dir("generated/uniffi")

android {
    namespace = "org.privcomm.client"
    compileSdk = 35
    defaultConfig {
        minSdk = 26
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += abis }
    }
    sourceSets["main"].apply {
        jniLibs.srcDir(rustLibs)
        kotlin.srcDir(uniffiOut)
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin { jvmToolchain(17) }

dependencies {
    // uniffi's bindings call the library through JNA.
    implementation("net.java.dev.jna:jna:5.13.0@aar")
}

// libprivcomm_client.so for every ABI, into build/rustJniLibs/<abi>/.
val cargoNdk by tasks.registering(Exec::class) {
    workingDir = workspace
    val targets = abis.flatMap { listOf("-t", it) }
    commandLine(
        listOf("cargo", "ndk") + targets +
            listOf("-o", rustLibs.get().asFile.path, "build", "--release", "-p", "privcomm-client", "--lib"),
    )
}

// The Kotlin bindings, generated from the host build of the same library
// (uniffi reads the interface from the library's metadata).
val uniffiBindings by tasks.registering(Exec::class) {
    workingDir = workspace
    commandLine("sh", "-c",
        "cargo build --release -p privcomm-client --lib && " +
            "cargo run --release -p privcomm-client --features bindgen --bin uniffi-bindgen -- " +
            "generate --no-format --library target/release/libprivcomm_client.so --language kotlin " +
            "--out-dir '${uniffiOut.get().asFile.path}'",
    )
}

tasks.named("preBuild") { dependsOn(cargoNdk, uniffiBindings) }
