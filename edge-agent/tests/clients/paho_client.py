"""A paho-mqtt device for edge-agent/tests/listen.rs.

Usage: paho_client.py PORT USER PASSWORD
Publishes, over MQTT 3.1.1 and 5, one message at QoS 0, 1 and 2 (valid JSON) and, over MQTT 5,
one invalid JSON at QoS 1; prints one JSON line per publish with the reason code paho saw.
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def run(protocol, name, publishes):
    done = {}
    cond = threading.Condition()

    def on_publish(client, userdata, mid, reason_code, properties):
        with cond:
            done[mid] = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
            cond.notify_all()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{name}", protocol=protocol)
    c.username_pw_set(user, password)
    c.on_publish = on_publish
    rc = c.connect("127.0.0.1", port, keepalive=30)
    assert rc == 0, rc
    c.loop_start()
    for topic, payload, qos in publishes:
        info = c.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)
        with cond:
            cond.wait_for(lambda: info.mid in done, timeout=10)
        print(json.dumps({"client": name, "qos": qos, "payload": payload, "rc": done.get(info.mid)}), flush=True)
    c.disconnect()
    c.loop_stop()


for protocol, name in [(mqtt.MQTTv311, "v311"), (mqtt.MQTTv5, "v5")]:
    pubs = [("cdr/paho", json.dumps({"id": f"{name}-q{q}"}), q) for q in (0, 1, 2)]
    if protocol == mqtt.MQTTv5:
        pubs.append(("cdr/paho", "not json", 1))
    run(protocol, name, pubs)
