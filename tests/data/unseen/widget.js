// A small search box that fetches suggestions while the user types.
import { debounce } from './util.js';

const MIN_CHARS = 2;
const cache = new Map();

export class SearchBox {
  constructor(root, { endpoint = '/api/suggest', limit = 8 } = {}) {
    this.root = root;
    this.endpoint = endpoint;
    this.limit = limit;
    this.input = root.querySelector('input[type="search"]');
    this.list = root.querySelector('ul.suggestions');
    this.controller = null;
    this.onInput = debounce(this.onInput.bind(this), 150);
    this.input.addEventListener('input', this.onInput);
    this.input.addEventListener('keydown', (event) => this.onKey(event));
  }

  async onInput() {
    const query = this.input.value.trim();
    if (query.length < MIN_CHARS) {
      this.render([]);
      return;
    }
    if (cache.has(query)) {
      this.render(cache.get(query));
      return;
    }
    this.controller?.abort();
    this.controller = new AbortController();
    try {
      const url = `${this.endpoint}?q=${encodeURIComponent(query)}&limit=${this.limit}`;
      const response = await fetch(url, { signal: this.controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const items = await response.json();
      cache.set(query, items);
      this.render(items);
    } catch (err) {
      if (err.name !== 'AbortError') console.error('suggest failed:', err);
    }
  }

  onKey(event) {
    const items = [...this.list.querySelectorAll('li')];
    const current = items.findIndex((li) => li.classList.contains('active'));
    if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
      event.preventDefault();
      const step = event.key === 'ArrowDown' ? 1 : -1;
      const next = (current + step + items.length) % items.length;
      items.forEach((li, i) => li.classList.toggle('active', i === next));
    } else if (event.key === 'Enter' && current >= 0) {
      window.location.href = items[current].dataset.href;
    }
  }

  render(items) {
    this.list.innerHTML = '';
    for (const item of items) {
      const li = document.createElement('li');
      li.textContent = item.title;
      li.dataset.href = item.url;
      this.list.appendChild(li);
    }
    this.list.hidden = items.length === 0;
  }
}

document.querySelectorAll('[data-search]').forEach((el) => new SearchBox(el));
