// A real conversation and a voice call through the generated Kotlin bindings,
// on the JVM: two clients (the Rust core loaded with JNA) against a real privcomm server
// whose URL scripts/kotlin-test passes in PRIVCOMM_SERVER. Exits non-zero on
// any failure.
package org.privcomm

import java.nio.file.Files
import java.util.UUID
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import uniffi.privcomm_client.CallEndReason
import uniffi.privcomm_client.CallInfo
import uniffi.privcomm_client.CallListener
import uniffi.privcomm_client.CallSettings
import uniffi.privcomm_client.CallState
import uniffi.privcomm_client.ChatMessage
import uniffi.privcomm_client.Client
import uniffi.privcomm_client.ClientConfig
import uniffi.privcomm_client.ClientException
import uniffi.privcomm_client.ClientListener
import uniffi.privcomm_client.ConnectionState

/** Everything a client tells its app, queued for the test to wait on. */
class Recorder : ClientListener {
    val states = LinkedBlockingQueue<ConnectionState>()
    val messages = LinkedBlockingQueue<ChatMessage>()
    val sent = LinkedBlockingQueue<String>()

    override fun onStateChanged(state: ConnectionState, detail: String) {
        states.put(state)
    }

    override fun onMessage(message: ChatMessage) {
        messages.put(message)
    }

    override fun onSent(messageId: String) {
        sent.put(messageId)
    }

    override fun onSendFailed(messageId: String, reason: String) {
        error("message $messageId refused: $reason")
    }

    override fun onIdentityChanged(contact: String, safetyNumber: String) {
        error("unexpected identity change of $contact")
    }

    override fun onUndecryptable(from: String, reason: String) {
        error("undecryptable message from $from: $reason")
    }

    fun awaitState(wanted: ConnectionState) {
        while (true) {
            val state = states.poll(30, TimeUnit.SECONDS) ?: error("no $wanted state within 30 s")
            if (state == wanted) return
            check(state != ConnectionState.ERROR) { "the client gave up connecting" }
        }
    }

    fun nextMessage(): ChatMessage = messages.poll(30, TimeUnit.SECONDS) ?: error("no message within 30 s")
}

/** Call changes, queued (a listener must not call back into the client). */
class CallRecorder : CallListener {
    val changes = LinkedBlockingQueue<CallInfo>()

    override fun onCallChanged(call: CallInfo) {
        changes.put(call)
    }

    fun await(state: CallState): CallInfo {
        while (true) {
            val call = changes.poll(30, TimeUnit.SECONDS) ?: error("no $state call within 30 s")
            if (call.state == state) return call
            check(call.state != CallState.ENDED) { "the call ended: $call" }
        }
    }
}

/** One 20 ms frame of a sine tone, continuing from sample [start]. */
fun tone(hz: Double, start: Int): List<Short> =
    List(960) { i -> (8000 * Math.sin(2 * Math.PI * hz * (start + i) / 48000)).toInt().toShort() }

/** The frequency from..to Hz (1 Hz steps) with the most power in [pcm] (Goertzel). */
fun dominant(pcm: List<Short>, from: Int, to: Int): Int = (from..to).maxByOrNull { hz ->
    val coefficient = 2 * Math.cos(2 * Math.PI * hz / 48000)
    var (s1, s2) = 0.0 to 0.0
    for (sample in pcm) {
        val s0 = sample + coefficient * s1 - s2
        s2 = s1
        s1 = s0
    }
    s1 * s1 + s2 * s2 - coefficient * s1 * s2
}!!

/** Alice calls bob through the bindings: both hear the other's tone, then alice hangs up. */
fun call(alice: Client, bob: Client, bobId: String) {
    val (aliceCalls, bobCalls) = CallRecorder() to CallRecorder()
    alice.setCallListener(aliceCalls)
    bob.setCallListener(bobCalls)
    val loopback = CallSettings(60_000u, 10_000u, "127.0.0.1")
    alice.configureCalls(loopback)
    bob.configureCalls(loopback)
    val id = alice.startCall(bobId)
    val incoming = bobCalls.await(CallState.INCOMING)
    check(incoming.callId == id && !incoming.outgoing) { "bob got $incoming" }
    bob.acceptCall(id)
    aliceCalls.await(CallState.CONNECTED)
    bobCalls.await(CallState.CONNECTED)
    val (atAlice, atBob) = mutableListOf<Short>() to mutableListOf<Short>()
    var next = System.nanoTime()
    for (frame in 0 until 75) {
        alice.pushAudio(id, tone(440.0, frame * 960))
        bob.pushAudio(id, tone(660.0, frame * 960))
        atAlice += alice.pullAudio(id)
        atBob += bob.pullAudio(id)
        next += 20_000_000
        Thread.sleep(maxOf(0, (next - System.nanoTime()) / 1_000_000))
    }
    val heardAtBob = dominant(atBob.takeLast(24000), 300, 800)
    val heardAtAlice = dominant(atAlice.takeLast(24000), 300, 800)
    check(Math.abs(heardAtBob - 440) <= 5) { "bob heard $heardAtBob Hz, not 440" }
    check(Math.abs(heardAtAlice - 660) <= 5) { "alice heard $heardAtAlice Hz, not 660" }
    alice.hangUp(id)
    check(aliceCalls.await(CallState.ENDED).endReason == CallEndReason.HANGUP)
    check(bobCalls.await(CallState.ENDED).endReason == CallEndReason.REMOTE_ENDED)
    println("kotlin call: bob heard $heardAtBob Hz, alice heard $heardAtAlice Hz")
}

fun main() {
    val server = System.getenv("PRIVCOMM_SERVER") ?: error("set PRIVCOMM_SERVER to the server's URL")
    val dir = Files.createTempDirectory("privcomm-kotlin")
    val (aliceEvents, bobEvents) = Recorder() to Recorder()
    val aliceKey = ByteArray(32) { 1 }
    val alice = Client(ClientConfig(dir.resolve("alice.db").toString(), aliceKey, server), aliceEvents)
    val bob = Client(ClientConfig(dir.resolve("bob.db").toString(), ByteArray(32) { 2 }, server), bobEvents)
    val tag = UUID.randomUUID().toString().takeLast(8).filter { it.isDigit() }.padEnd(4, '0')
    val aliceId = alice.register("+1555${tag}01")
    val bobId = bob.register("+1555${tag}02")
    check(alice.userId() == aliceId)
    alice.connect()
    bob.connect()
    aliceEvents.awaitState(ConnectionState.CONNECTED)
    bobEvents.awaitState(ConnectionState.CONNECTED)
    check(alice.state() == ConnectionState.CONNECTED)

    val count = 20
    for (n in 0 until count) {
        alice.sendText(bobId, "from kotlin alice #$n")
        bob.sendText(aliceId, "from kotlin bob #$n")
    }
    for (n in 0 until count) {
        val atBob = bobEvents.nextMessage()
        check(atBob.text == "from kotlin alice #$n" && atBob.peer == aliceId && !atBob.outgoing) { "bob got $atBob" }
        val atAlice = aliceEvents.nextMessage()
        check(atAlice.text == "from kotlin bob #$n" && atAlice.peer == bobId) { "alice got $atAlice" }
    }
    check(alice.messages().size == 2 * count) { "alice's log holds ${alice.messages().size} messages" }
    val safety = alice.safetyNumber(bobId)
    check(safety.length == 60 && safety == bob.safetyNumber(aliceId)) { "safety numbers differ" }

    call(alice, bob, bobId)

    // A wrong store key: a typed error, and the store still opens with the right one.
    alice.close()
    try {
        Client(ClientConfig(dir.resolve("alice.db").toString(), ByteArray(32) { 9 }, server), Recorder())
        error("a wrong store key opened the store")
    } catch (expected: ClientException.WrongStoreKey) {
        println("wrong key refused: ${expected.message}")
    }
    val reopened = Client(ClientConfig(dir.resolve("alice.db").toString(), aliceKey, server), Recorder())
    check(reopened.messages().size == 2 * count)
    reopened.close()
    bob.close()
    println("kotlin conversation and call against $server: OK ($count messages each way)")
}
