// The Android library module that packages privcomm's client core for apps:
// the Rust library (android/, built for each ABI with cargo-ndk) and its
// uniffi-generated Kotlin bindings. Build with `gradle assembleRelease` on a
// machine with the Android SDK + NDK and `cargo install cargo-ndk`.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "privcomm-client"
