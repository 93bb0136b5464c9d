// Copies microphone samples (float32 at the AudioContext's rate) to the page in ~50 ms blocks.
class Recorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = [];
    this.size = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      this.block.push(channel.slice());
      this.size += channel.length;
      if (this.size >= sampleRate / 20) {
        const out = new Float32Array(this.size);
        let at = 0;
        for (const b of this.block) { out.set(b, at); at += b.length; }
        this.port.postMessage(out, [out.buffer]);
        this.block = [];
        this.size = 0;
      }
    }
    return true;
  }
}
registerProcessor("thinktalk-recorder", Recorder);
