// A real conversation through the generated Kotlin bindings, on the JVM:
// two clients (the Rust core loaded with JNA) against a real privcomm server
// whose URL scripts/kotlin-test passes in PRIVCOMM_SERVER. Exits non-zero on
// any failure.
package org.privcomm

import java.nio.file.Files
import java.util.UUID
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
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
    println("kotlin conversation against $server: OK ($count messages each way)")
}
